"""What the views show of a run, read once through ``open_run``: the image index, the overview, the
audit's tables (when ``cdam audit`` has run) and the gallery queries of the dashboard and the report.

A class's gallery holds every image predicted as the class or labelled as it; filters narrow it by
prediction, label, correctness, audit cluster, or a box on the audit's 2-D plot of the class.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from cdam_worker.reading import Run, RunError
from schemas.audit import CONTACT_SHEET_NAME, audit_flags

AUDIT_FOLDER = "audit"
CONTACT_SHEETS = f"{AUDIT_FOLDER}/contact-sheets"
NO_LABEL = -1
ERRORS_SHOWN = 50


def no_audit_note(url: str) -> str:
    """What a view that needs the audit says when there is none."""
    return f"no audit yet: run `cdam audit {url}`"


@dataclass(frozen=True)
class Audit:
    """The tables ``cdam audit`` wrote into the run (columns: see the audit's README section)."""

    classes: pa.Table  # class, class_name, n_images, score, rank, flagged, reasons; sorted by rank
    clusters: pa.Table  # class, cluster, size, share, purity, prototype, medoid_key, flagged
    images: pa.Table  # key, row, class, cluster, x, y, score, flagged
    contact_sheets: dict[
        int, dict[int, str]
    ]  # class index -> flagged cluster -> path of its contact sheet below the run
    flags: str = ""  # the flags of `cdam audit` that made it (schemas.audit.audit_flags), "" if summary.json is missing


def read_audit(run: Run) -> Audit | None:
    """The run's audit, or None when ``cdam audit`` has not written ``audit/classes.parquet``."""
    try:
        classes = run.table(f"{AUDIT_FOLDER}/classes.parquet")
        clusters = run.table(f"{AUDIT_FOLDER}/clusters.parquet")
        images = run.table(f"{AUDIT_FOLDER}/images.parquet")
    except FileNotFoundError:
        return None
    sheets: dict[int, dict[int, str]] = {}
    for path in run.storage.list(CONTACT_SHEETS):
        if named := CONTACT_SHEET_NAME.fullmatch(path.rsplit("/", 1)[-1]):
            sheets.setdefault(int(named[1]), {})[int(named[2])] = path
    try:
        flags = audit_flags(json.loads(run.storage.get(f"{AUDIT_FOLDER}/summary.json")), run.class_names)
    except FileNotFoundError:
        flags = ""
    return Audit(
        classes.sort_by("rank"),
        clusters.sort_by([("class", "ascending"), ("cluster", "ascending")]),
        images,
        sheets,
        flags,
    )


@dataclass(frozen=True)
class GalleryQuery:
    """One page of a class's gallery: filters (None = any) and the page's place."""

    class_index: int
    pred: int | None = None
    label: int | None = None
    correct: bool | None = None
    cluster: int | None = None
    box: tuple[float, float, float, float] | None = None  # x0, y0, x1, y1 on the audit's 2-D plot
    offset: int = 0
    limit: int = 48


@dataclass(frozen=True)
class ClassAudit:
    """The audit's per-image results for one class, aligned with positions in the catalog's index."""

    positions: np.ndarray  # int64
    keys: list[str]
    cluster: np.ndarray  # int64
    x: np.ndarray  # float64
    y: np.ndarray
    score: np.ndarray
    flagged: np.ndarray  # bool


class Catalog:
    """The run as the views see it. Built once per server or report; cheap queries afterwards."""

    def __init__(self, run: Run) -> None:
        self.run = run
        index = run.index
        self.keys: list[str] = index.column("key").to_pylist()
        self.rows = index.column("row").to_numpy().astype(np.int64)
        self.labels = index.column("label").fill_null(NO_LABEL).to_numpy().astype(np.int64)
        self.preds = index.column("pred").to_numpy().astype(np.int64)
        self.position = {key: position for position, key in enumerate(self.keys)}
        self.class_names = run.class_names
        self.audit = read_audit(run)
        self.no_audit = no_audit_note(run.url)

    # -- the run as a whole ---------------------------------------------------------------------

    def overview(self) -> dict[str, Any]:
        """Model, targets, variant, counts, errors, accuracy and what was not read."""
        attrs = self.run.attrs
        labelled = self.labels != NO_LABEL
        gh, gw = self.run.grid
        return {
            "url": self.run.url,
            "model": (attrs.get("model") or {}).get("name") or "?",
            "method": attrs.get("method", "?"),
            "targets": attrs.get("targets", "?"),
            "concepts": [c["name"] for c in attrs.get("concepts", [])],
            "variant": attrs.get("variant", {}),
            "grid": f"{gh} x {gw} tokens",
            "input_size": "x".join(str(v) for v in attrs.get("input_size", [])[1:]),
            "maps_dtype": attrs.get("maps_dtype", "?"),
            "n_classes": len(self.class_names),
            "n_images": len(self.keys),
            "n_errors": self.run.errors.num_rows,
            "n_labelled": int(labelled.sum()),
            "accuracy": float((self.preds[labelled] == self.labels[labelled]).mean()) if labelled.any() else None,
            "shards_complete": sum(s.complete for s in self.run.shards),
            "n_shards": len(self.run.shards),
            "complete": self.run.complete,
            "skipped": list(self.run.skipped),
            "audit_flags": None if self.audit is None else self.audit.flags,
        }

    def errors(self, limit: int = ERRORS_SHOWN) -> tuple[list[dict[str, Any]], int]:
        """The first ``limit`` rows of errors/ (shard, key, reason) and how many there are in all."""
        table = self.run.errors
        return table.slice(0, limit).select(["shard", "key", "reason"]).to_pylist(), table.num_rows

    def class_counts(self) -> list[dict[str, Any]]:
        """Per class: images predicted as it, labelled as it, and the accuracy on those labelled as it."""
        n = len(self.class_names)
        predicted = np.bincount(self.preds, minlength=n)[:n]
        labelled_as = np.bincount(self.labels[self.labels >= 0], minlength=n)[:n]
        hits = np.bincount(self.labels[(self.labels >= 0) & (self.preds == self.labels)], minlength=n)[:n]
        return [
            {
                "class": c,
                "name": name,
                "predicted": int(predicted[c]),
                "labelled": int(labelled_as[c]),
                "accuracy": float(hits[c] / labelled_as[c]) if labelled_as[c] else None,
            }
            for c, name in enumerate(self.class_names)
        ]

    def leaderboard(self) -> list[dict[str, Any]]:
        """The audit's classes, most suspicious first (empty without an audit)."""
        return [] if self.audit is None else self.audit.classes.to_pylist()

    # -- classes --------------------------------------------------------------------------------

    def class_index(self, text: str | int) -> int:
        """A class's index from its name or index (RunError naming it otherwise)."""
        return self.run.class_index(text)

    def class_audit_row(self, class_index: int) -> dict[str, Any] | None:
        if self.audit is None:
            return None
        rows = self.audit.classes.filter(pc.equal(self.audit.classes["class"], class_index)).to_pylist()
        return rows[0] if rows else None

    def clusters(self, class_index: int) -> list[dict[str, Any]]:
        """The audit's clusters of a class with their prototype as a (gh, gw) array."""
        if self.audit is None:
            return []
        gh, gw = self.run.grid
        rows = self.audit.clusters.filter(pc.equal(self.audit.clusters["class"], class_index)).to_pylist()
        for row in rows:
            row["prototype"] = np.asarray(row["prototype"], dtype=np.float32).reshape(gh, gw)
        return rows

    def flagged_medoids(self) -> list[dict[str, Any]]:
        """The medoid of every flagged cluster of a flagged class, classes by rank, clusters by score:
        class, class_name, cluster, medoid_key, size, score (None from an audit without cluster scores;
        empty without an audit)."""
        medoids = []
        for row in self.leaderboard():
            if not row["flagged"]:
                continue
            flagged = sorted(
                (k for k in self.clusters(row["class"]) if k["flagged"] and k["medoid_key"] in self.position),
                key=lambda k: -(k.get("score") or 0.0),
            )
            medoids += [
                {
                    "class": row["class"],
                    "class_name": row["class_name"],
                    "cluster": k["cluster"],
                    "medoid_key": k["medoid_key"],
                    "size": k["size"],
                    "score": k.get("score"),
                }
                for k in flagged
            ]
        return medoids

    @functools.lru_cache(maxsize=256)  # noqa: B019 - one cache per catalog
    def class_audit(self, class_index: int) -> ClassAudit | None:
        """The audit's images of a class (those of them still in the run's index), or None without an audit."""
        if self.audit is None:
            return None
        table = self.audit.images.filter(pc.equal(self.audit.images["class"], class_index))
        keys = table.column("key").to_pylist()
        known = np.fromiter((key in self.position for key in keys), dtype=bool, count=len(keys))
        table = table.filter(pa.array(known))
        keys = table.column("key").to_pylist()
        return ClassAudit(
            positions=np.fromiter((self.position[key] for key in keys), dtype=np.int64, count=len(keys)),
            keys=keys,
            cluster=table.column("cluster").to_numpy().astype(np.int64),
            x=table.column("x").to_numpy().astype(np.float64),
            y=table.column("y").to_numpy().astype(np.float64),
            score=table.column("score").to_numpy().astype(np.float64),
            flagged=table.column("flagged").to_numpy(zero_copy_only=False).astype(bool),
        )

    def gallery(self, query: GalleryQuery) -> dict[str, Any]:
        """One page of a class's images that pass the filters, in row order."""
        c = query.class_index
        selected = (self.preds == c) | (self.labels == c)
        if query.pred is not None:
            selected &= self.preds == query.pred
        if query.label is not None:
            selected &= self.labels == query.label
        if query.correct is not None:  # only labelled images are right or wrong
            selected &= (self.labels != NO_LABEL) & ((self.preds == self.labels) == query.correct)
        cluster_of = np.full(len(self.keys), -1, dtype=np.int64)
        audit = self.class_audit(c)
        if audit is not None:
            cluster_of[audit.positions] = audit.cluster
        if query.cluster is not None:
            selected &= cluster_of == query.cluster
        if query.box is not None:
            inside = np.zeros(len(self.keys), dtype=bool)
            if audit is not None:
                x0, y0, x1, y1 = query.box
                hit = (
                    (audit.x >= min(x0, x1))
                    & (audit.x <= max(x0, x1))
                    & (audit.y >= min(y0, y1))
                    & (audit.y <= max(y0, y1))
                )
                inside[audit.positions[hit]] = True
            selected &= inside
        positions = np.flatnonzero(selected)
        page = positions[query.offset : query.offset + query.limit]
        return {
            "class": c,
            "total": int(len(positions)),
            "offset": query.offset,
            "limit": query.limit,
            "pages": max(1, math.ceil(len(positions) / query.limit)),
            "items": [self._item(int(p), int(cluster_of[p])) for p in page],
        }

    def _item(self, position: int, cluster: int) -> dict[str, Any]:
        label, pred = int(self.labels[position]), int(self.preds[position])
        return {
            "key": self.keys[position],
            "row": int(self.rows[position]),
            "label": None if label == NO_LABEL else label,
            "label_name": None if label == NO_LABEL else self._name(label),
            "pred": pred,
            "pred_name": self._name(pred),
            "correct": None if label == NO_LABEL else label == pred,
            "cluster": None if cluster < 0 else cluster,
        }

    def _name(self, class_index: int) -> str:
        return self.class_names[class_index] if 0 <= class_index < len(self.class_names) else str(class_index)

    def scatter(self, class_index: int) -> dict[str, Any]:
        """The audit's 2-D plot of a class: one point per image (key, x, y, cluster, flagged)."""
        audit = self.class_audit(class_index)
        if audit is None:
            return {"points": 0, "note": self.no_audit}
        return {
            "points": len(audit.keys),
            "key": audit.keys,
            "x": audit.x.round(5).tolist(),
            "y": audit.y.round(5).tolist(),
            "cluster": audit.cluster.tolist(),
            "flagged": audit.flagged.tolist(),
        }

    def chosen_images(self, class_index: int, per_cluster: int, limit: int) -> list[tuple[str, str]]:
        """The report's images of a class, (key, why): each audit cluster's medoid, then its images with the
        highest audit score; without an audit, the first images predicted as the class."""
        audit = self.class_audit(class_index)
        if audit is None:
            positions = np.flatnonzero(self.preds == class_index)[:limit]
            return [(self.keys[p], "predicted as the class") for p in positions]
        chosen: list[tuple[str, str]] = []
        for cluster in self.clusters(class_index):
            members = np.flatnonzero(audit.cluster == cluster["cluster"])
            by_score = members[np.argsort(-audit.score[members], kind="stable")]
            picks = [(cluster["medoid_key"], f"medoid of cluster {cluster['cluster']}")]
            picks += [
                (audit.keys[i], f"cluster {cluster['cluster']}, audit score {audit.score[i]:.2f}")
                for i in by_score
                if audit.keys[i] != cluster["medoid_key"]
            ]
            chosen += [pick for pick in picks[:per_cluster] if pick[0] in self.position]
        return chosen[:limit]

    # -- images ---------------------------------------------------------------------------------

    def record(self, key: str) -> dict[str, Any]:
        """The metadata row of an explained image (RunError if the key is not one)."""
        if key not in self.position:
            raise RunError(f"key {key!r} is not an explained image of {self.run.url}")
        table = self.run.metadata.to_table(filter=ds.field("key") == key)
        return table.slice(0, 1).to_pylist()[0]

    def maps_written(self, key: str) -> bool:
        """Whether the image's Zarr row holds maps (False: the row reads as fill values, NaN)."""
        target_class = self.run.read_rows("target_class", np.asarray([self.rows[self.position[key]]]))
        return bool((target_class != -2).any())
