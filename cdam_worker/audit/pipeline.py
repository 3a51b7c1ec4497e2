"""The audit of a run, from its maps to its tables: gather, check the blind spot, cluster and score each class."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from cdam_worker.audit.appearance import OUTSIDE_SAMPLE, search_by_look, with_look
from cdam_worker.audit.blind_spot import BlindSpot, check_blind_spot
from cdam_worker.audit.clustering import spectral_clusters
from cdam_worker.audit.confirmation import Confirmation, unconfirmed_row
from cdam_worker.audit.cues import (
    ALPHA,
    KINDS,
    Finding,
    PlaceStatistics,
    find,
    place_statistics,
)
from cdam_worker.audit.features import ImageFeatures, place_rarity
from cdam_worker.audit.gather import Gathered, gather
from cdam_worker.audit.scoring import (
    MIN_CLUSTER_IMAGES,
    MIN_CLUSTER_SHARE,
    ClusterReport,
    describe_cluster,
    reasons_in_words,
)
from cdam_worker.reading import Run, RunError
from cdam_worker.reading.cluster import run_units
from schemas.audit import CLASSES_SCHEMA, CLUSTERS_SCHEMA, IMAGES_SCHEMA


@dataclass(frozen=True)
class AuditOptions:
    """What to audit: ``by`` "pred" or "label", a subset of ``classes`` (indices; empty = all), ``min_images``."""

    by: str = "pred"
    classes: tuple[int, ...] = ()
    min_images: int = 20

    def __post_init__(self) -> None:
        if self.by not in ("pred", "label"):
            raise RunError(f"--by {self.by!r}: expected pred or label")
        if self.min_images < 4:
            raise RunError(f"--min-images {self.min_images}: at least 4 images are needed to cluster a class")


@dataclass
class ClassAudit:
    """One audited class: its finding, its clusters and, per image, cluster, 2-D coordinates, score and kind."""

    index: int
    name: str
    positions: np.ndarray  # indices into Gathered
    clusters: list[ClusterReport]
    labels: np.ndarray  # per image: its cluster
    coordinates: np.ndarray  # per image: (x, y)
    image_scores: np.ndarray  # per image: the share of the other classes' images with less evidence off place (cues.py)
    image_flagged: np.ndarray  # per image: flagged by a finding (in a flagged cluster)
    image_kinds: np.ndarray  # per image: the kind of its finding, "" if not flagged
    spots: np.ndarray  # per image: (y, x) centre of its spot (grid fractions); for a mark, the mark's spot off place
    finding: Finding
    eigenvalues: np.ndarray  # the smallest Laplacian eigenvalues (their largest gap chose the clusters)
    score: float
    reasons: str
    rank: int = 0

    @property
    def flagged(self) -> bool:
        return any(c.flagged for c in self.clusters)


@dataclass
class AuditResult:
    """The audit's tables and what it could not do."""

    classes: pa.Table
    clusters: pa.Table
    images: pa.Table
    audited: list[ClassAudit]
    gathered: Gathered
    blind_spot: BlindSpot
    place: PlaceStatistics  # the run's place statistics, which the images table is built from
    not_audited: dict[str, str] = field(default_factory=dict)  # class name -> why
    skipped: list[str] = field(default_factory=list)  # one-line notes: shards not read, images left out
    confirmations: dict[tuple[int, int], Confirmation] = field(
        default_factory=dict
    )  # (class, cluster) -> the model's test
    confirmation_note: str = "findings unconfirmed: the model was not run"  # one line: what the model's tests did

    def summary(self, run: Run, options: AuditOptions) -> dict[str, Any]:
        """What ``audit/summary.json`` records."""
        return {
            "run": run.url,
            "by": options.by,
            "options": {"classes": list(options.classes), "min_images": options.min_images},
            "alpha": ALPHA,
            "images_audited": len(self.gathered.keys),
            "classes_audited": len(self.audited),
            "classes_flagged": [a.name for a in sorted(self.audited, key=lambda a: a.rank) if a.flagged],
            "blind_spot": self.blind_spot.as_dict(),
            "not_audited": self.not_audited,
            "skipped": self.skipped,
            "confirmation": {
                "note": self.confirmation_note,
                "clusters_tested": len(self.confirmations),
                "seconds": round(sum(c.seconds for c in self.confirmations.values()), 3),
            },
        }


def audit_run(
    run: Run,
    options: AuditOptions,
    progress: Callable[[int], None] = lambda _rows: None,
    address: str | None = None,
) -> AuditResult:
    """Audit every class of ``run`` (or ``options.classes``) as the package docstring describes: here, or with
    the reading of the maps (a task per block of rows) and each class's audit (a task per class) as Ray tasks on
    the cluster at ``address`` (or RAY_ADDRESS); the tables are the same bytes either way."""
    wanted = set(options.classes) or None
    gathered = gather(run, options.by, wanted, progress, address)
    names = run.class_names
    skipped = list(run.skipped) + _error_notes(run) + _left_out_notes(gathered, names, options.by)
    counts = np.bincount(gathered.classes, minlength=len(names))
    not_audited: dict[str, str] = {}
    for c in sorted(wanted or set(gathered.no_map) | set(gathered.unreadable)):
        if counts[c] == 0:
            not_audited[names[c]] = _why_no_images(gathered, c, options.by)
    for c in np.flatnonzero((counts > 0) & (counts < options.min_images)):
        not_audited[names[c]] = (
            f"{counts[c]} image(s) with a stored map of it, fewer than --min-images {options.min_images}"
        )
    kept = np.isin(gathered.classes, np.flatnonzero(counts >= options.min_images))
    audited_classes = np.where(kept, gathered.classes, -1)
    rarity = place_rarity(gathered.features.spot_y, gathered.features.spot_x, audited_classes, run.grid)
    # Without a competitor map the evidence is not class-specific (an object's shared parts count): such
    # images take no part in the place findings.
    place_classes = np.where(gathered.features.competitors > 0, audited_classes, -1)
    place = place_statistics(
        gathered.features.share,
        gathered.class_maps,
        place_classes,
        len(names),
        gathered.target_classes,
        gathered.target_shares,
    )
    other_labels = _other_label_counts(gathered, kept, len(names)) if options.by == "pred" else None
    to_audit = np.flatnonzero(counts >= options.min_images)
    context = RunContext(place_classes, rarity, place, other_labels, len(to_audit), options.by)
    gathered.release()
    units = [(int(c), names[int(c)]) for c in to_audit]
    audited = run_units(
        _audit_unit, units, run, (gathered, context), done=lambda _: gathered.release(), address=address
    )
    for rank, audit in enumerate(sorted(audited, key=lambda a: (-a.score, a.index)), start=1):
        audit.rank = rank
    audited.sort(key=lambda a: a.rank)
    return AuditResult(
        classes=_classes_table(audited),
        clusters=_clusters_table(audited),
        images=_images_table(audited, gathered, place),
        audited=audited,
        gathered=gathered,
        blind_spot=check_blind_spot(run, gathered.rows),
        place=place,
        not_audited=not_audited,
        skipped=skipped,
    )


def apply_confirmations(
    result: AuditResult, confirmations: dict[tuple[int, int], Confirmation], notes: list[str]
) -> AuditResult:
    """Record the model's tests (``confirm.confirm_clusters``) in ``result``: a flagged cluster the model does not rely
    on is unflagged (its score kept), each tested class's reasons say what the tests found, classes are re-ranked
    (flagged first, then by score) and the tables rebuilt."""
    for audit in result.audited:
        tested = [
            (c, confirmations[(audit.index, c.cluster)])
            for c in audit.clusters
            if (audit.index, c.cluster) in confirmations
        ]
        for cluster, confirmation in tested:
            if not confirmation.relied_on:
                cluster.flagged = False
                audit.image_flagged[audit.labels == cluster.cluster] = False
                audit.image_kinds[audit.labels == cluster.cluster] = ""
        if tested:
            audit.reasons = f"{audit.reasons}; {_confirmation_in_words(tested)}"
    for rank, audit in enumerate(sorted(result.audited, key=lambda a: (not a.flagged, -a.score, a.index)), start=1):
        audit.rank = rank
    result.audited.sort(key=lambda a: a.rank)
    relied = sum(c.relied_on for c in confirmations.values())
    result.confirmations = confirmations
    result.confirmation_note = (
        f"the model relies on {relied} of the {len(confirmations)} flagged cluster(s) it tested"
        if confirmations
        else "no flagged cluster to confirm with the model"
    )
    result.skipped += notes
    result.classes, result.clusters = (
        _classes_table(result.audited, confirmations),
        _clusters_table(result.audited, confirmations),
    )
    result.images = _images_table(result.audited, result.gathered, result.place)
    return result


def _confirmation_in_words(tested: list[tuple[ClusterReport, Confirmation]]) -> str:
    """What the model's tests of a class's clusters found: the clearest relied-on cluster (largest logit drop), or the
    most suspicious one when none is relied on, and which were unflagged."""
    relied = [(c, t) for c, t in tested if t.relied_on]
    ignored = [c.cluster for c, t in tested if not t.relied_on]
    if not relied:
        top, test = max(tested, key=lambda pair: pair[0].score)
        more = f" ({len(tested) - 1} more cluster(s) tested, none relied on)" if len(tested) > 1 else ""
        return f"not flagged, the model does not rely on what the maps point at: cluster {top.cluster}: {test.in_words()}{more}"
    top, test = max(relied, key=lambda pair: pair[1].drop[0] if np.isfinite(pair[1].drop[0]) else -np.inf)
    text = f"model check: it relies on {len(relied)} of {len(tested)} tested cluster(s); cluster {top.cluster}: {test.in_words()}"
    if ignored:
        text += f"; cluster(s) {', '.join(map(str, ignored))} not relied on, unflagged"
    return text


def _other_label_counts(gathered: Gathered, kept: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class: its labelled audited images labelled as another class, and its labelled audited images."""
    labelled = kept & (gathered.labels >= 0)
    classes = gathered.classes[labelled]
    wrong = np.bincount(classes, weights=(gathered.labels[labelled] != classes).astype(float), minlength=n_classes)
    return wrong, np.bincount(classes, minlength=n_classes).astype(float)


@dataclass(frozen=True)
class ClassData:
    """One class's images to audit: their positions in the gathered images, keys, labels, class maps, features."""

    index: int
    name: str
    positions: np.ndarray
    keys: np.ndarray
    labels: np.ndarray
    class_maps: np.ndarray
    features: ImageFeatures

    @staticmethod
    def of(gathered: Gathered, index: int, name: str) -> ClassData:
        positions = np.flatnonzero(gathered.classes == index)
        return ClassData(
            index,
            name,
            positions,
            gathered.keys[positions],
            gathered.labels[positions],
            gathered.class_maps[positions],
            gathered.features.take(positions),
        )


@dataclass(frozen=True)
class RunContext:
    """What every class is audited against, per gathered image: its audited class for the place statistics (-1:
    none), place rarity and place statistics; the other-label counts (``--by pred``), the number of tests, ``by``."""

    audited_classes: np.ndarray
    rarity: np.ndarray
    place: PlaceStatistics
    other_labels: tuple[np.ndarray, np.ndarray] | None
    n_tests: int
    by: str


def _audit_unit(unit: tuple[int, str], run: Run, shared: tuple[Gathered, RunContext]) -> ClassAudit:
    """One class's audit as a unit of work (here or as a Ray task)."""
    gathered, context = shared
    return audit_class(ClassData.of(gathered, *unit), context, run, lambda: _outside_sample(gathered, unit[0]))


def _outside_sample(gathered: Gathered, index: int) -> np.ndarray:
    """The keys of a seeded sample of the other audited classes' images (step 8 searches them for a mark's look)."""
    others = gathered.in_row_order((gathered.classes != index) & (gathered.classes >= 0))
    rng = np.random.default_rng([index])
    chosen = rng.choice(len(others), size=min(OUTSIDE_SAMPLE, len(others)), replace=False)
    return gathered.keys[others[np.sort(chosen)]]


def audit_class(
    data: ClassData,
    context: RunContext,
    run: Run | None = None,
    outside: Callable[[], np.ndarray] | None = None,
) -> ClassAudit:
    """Cluster one class's images, find what its maps point at against the run, and describe its clusters; with
    ``run``, a mark's images are found again by its look in their pixels (appearance.py), checked against the keys
    of other classes' images that ``outside()`` gives (asked for only when the class has a mark)."""
    index, name, positions = data.index, data.name, data.positions
    audited_classes, rarity, place = context.audited_classes, context.rarity, context.place
    other_labels, n_tests, by = context.other_labels, context.n_tests, context.by
    features = data.features.take(np.arange(len(positions)))  # its own copy: a mark's spot is set below
    descriptors = features.descriptor(rarity[positions])
    clustering = spectral_clusters(descriptors)
    keys, labels, maps = data.keys, data.labels, data.class_maps
    labelled = labels >= 0
    if other_labels is None or not labelled.any():
        finding = find(positions, audited_classes, place, n_tests, None, 0.0, 0)
    else:
        wrong, total = other_labels
        usual = (wrong.sum() - wrong[index]) / max(total.sum() - total[index], 1.0)
        is_other = (labels != index) & labelled
        finding = find(positions, audited_classes, place, n_tests, is_other, float(usual), int(labelled.sum()))
    if finding.flagged.sum() < max(MIN_CLUSTER_IMAGES, MIN_CLUSTER_SHARE * len(positions)):
        finding.flagged[:] = False
        finding.kinds[:] = ""
    spots = place.off_spot[positions] if finding.mark_spots is None else finding.mark_spots
    look_note = ""
    if run is not None and outside is not None and (finding.kinds == "mark").any():
        search = search_by_look(run, keys, finding.kinds == "mark", spots, run.grid, outside())
        finding, look_note = with_look(finding, search, spots), f"; its look: {search.note}"
        spots = spots if finding.mark_spots is None else finding.mark_spots
    off_place = place.off_place[positions]
    is_mark = finding.kinds == "mark"  # a mark's spot is where the mark lies, not the object's
    features.spot_y[is_mark], features.spot_x[is_mark] = spots[is_mark].T
    groups = [(np.flatnonzero(finding.kinds == kind), kind) for kind in KINDS]
    groups += [(np.flatnonzero((clustering.labels == k) & ~finding.flagged), "") for k in range(clustering.n_clusters)]
    groups = [(members, kind) for members, kind in groups if len(members)]
    effect = {"mark": finding.cue_share, "background": finding.cue_share, "tipping": finding.tipping_excess, "": 0.0}
    clusters = [
        describe_cluster(
            k,
            members,
            features,
            rarity[positions],
            off_place,
            descriptors,
            maps,
            keys,
            labels,
            index,
            by,
            kind,
            effect[kind],
        )
        for k, (members, kind) in enumerate(groups)
    ]
    cluster_of = np.zeros(len(positions), dtype=np.int64)
    for k, (members, _) in enumerate(groups):
        cluster_of[members] = k
    reference = np.sort(place.off_place[(audited_classes >= 0) & (audited_classes != index)])
    image_scores = (np.searchsorted(reference, off_place, side="left") / max(len(reference), 1)).astype(np.float32)
    image_scores[finding.kinds == "tipping"] = 1.0
    return ClassAudit(
        index=index,
        name=name,
        positions=positions,
        clusters=clusters,
        labels=cluster_of,
        coordinates=clustering.coordinates,
        image_scores=image_scores,
        image_flagged=finding.flagged.copy(),
        image_kinds=finding.kinds.astype(str),
        spots=np.column_stack([features.spot_y, features.spot_x]),
        finding=finding,
        eigenvalues=clustering.eigenvalues,
        score=finding.score if finding.flagged.any() else min(finding.score, 0.49),
        reasons=reasons_in_words(finding, clusters, len(positions)) + look_note,
    )


def _classes_table(
    audited: list[ClassAudit], confirmations: dict[tuple[int, int], Confirmation] | None = None
) -> pa.Table:
    confirmations = confirmations or {}
    tests = {
        a.index: [
            confirmations[(a.index, c.cluster)].relied_on for c in a.clusters if (a.index, c.cluster) in confirmations
        ]
        for a in audited
    }
    return pa.Table.from_pylist(
        [
            {
                "class": a.index,
                "class_name": a.name,
                "n_images": len(a.positions),
                "score": a.score,
                "rank": a.rank,
                "flagged": a.flagged,
                "reasons": a.reasons,
                "n_clusters": len(a.clusters),
                "eigenvalues": a.eigenvalues.astype(np.float32).tolist(),
                "kinds": [c.kind for c in a.clusters if c.flagged],
                "place_p": a.finding.place_p,
                "tipping_p": a.finding.tipping_p,
                "relied_on": any(tests[a.index]) if tests[a.index] else None,
            }
            for a in audited
        ],
        schema=CLASSES_SCHEMA,
    )


def _clusters_table(
    audited: list[ClassAudit], confirmations: dict[tuple[int, int], Confirmation] | None = None
) -> pa.Table:
    confirmations = confirmations or {}
    tests = {
        (a.index, c.cluster): confirmations[(a.index, c.cluster)].as_row()
        if (a.index, c.cluster) in confirmations
        else unconfirmed_row()
        for a in audited
        for c in a.clusters
    }
    return pa.Table.from_pylist(
        [
            {
                "class": a.index,
                "cluster": c.cluster,
                "size": c.size,
                "share": c.share,
                "purity": c.purity,
                "prototype": c.prototype.astype(np.float32).ravel().tolist(),
                "medoid_key": c.medoid_key,
                "flagged": c.flagged,
                "score": c.score,
                "focus": c.focus,
                "concentration": c.concentration,
                "rarity": c.rarity,
                "other_labels": c.other_labels,
                "spot_area": c.spot_area,
                "place": c.place,
                "centroid_y": c.centroid_y,
                "centroid_x": c.centroid_x,
                "spread": c.spread,
                "border": c.border,
                "kind": c.kind,
                "off_place": c.off_place,
            }
            | tests[(a.index, c.cluster)]
            for a in audited
            for c in a.clusters
        ],
        schema=CLUSTERS_SCHEMA,
    )


def _images_table(audited: list[ClassAudit], gathered: Gathered, place: PlaceStatistics) -> pa.Table:
    """One row per audited image, in row order."""
    parts = [
        (a.positions, a.index, a.labels, a.coordinates, a.image_scores, a.image_flagged, a.image_kinds, a.spots)
        for a in audited
    ]
    if not parts:
        return IMAGES_SCHEMA.empty_table()
    positions = np.concatenate([p[0] for p in parts])
    order = np.argsort(gathered.rows[positions], kind="stable")
    positions = positions[order]
    coordinates = np.concatenate([p[3] for p in parts])[order]
    spots = np.concatenate([p[7] for p in parts])[order]
    return pa.table(
        {
            "key": pa.array(gathered.keys[positions].tolist(), pa.string()),
            "row": pa.array(gathered.rows[positions], pa.int64()),
            "class": pa.array(np.concatenate([np.full(len(p[0]), p[1]) for p in parts])[order], pa.int32()),
            "cluster": pa.array(np.concatenate([p[2] for p in parts])[order], pa.int32()),
            "x": pa.array(coordinates[:, 0], pa.float32()),
            "y": pa.array(coordinates[:, 1], pa.float32()),
            "score": pa.array(np.concatenate([p[4] for p in parts])[order], pa.float32()),
            "flagged": pa.array(np.concatenate([p[5] for p in parts])[order], pa.bool_()),
            "spot_y": pa.array(spots[:, 0], pa.float32()),
            "spot_x": pa.array(spots[:, 1], pa.float32()),
            "kind": pa.array(np.concatenate([p[6] for p in parts])[order].tolist(), pa.string()),
            "off_place": pa.array(place.off_place[positions], pa.float32()),
        },
        schema=IMAGES_SCHEMA,
    )


def _error_notes(run: Run) -> list[str]:
    """What errors/ says was never explained (samples and whole shards)."""
    keys = run.errors.column("key")
    samples = len(keys) - keys.null_count
    notes = [f"{samples} sample(s) listed in errors/ could not be explained: not audited"] if samples else []
    if keys.null_count:
        notes.append(f'{keys.null_count} shard-level error(s) in errors/ (cdam query {run.url} "SELECT * FROM errors")')
    return notes


def _left_out_notes(gathered: Gathered, names: list[str], by: str) -> list[str]:
    """One line per kind of image left out of the audit, with counts."""
    notes = []
    if gathered.no_label:
        notes.append(f"{gathered.no_label} image(s) without a label: not audited (--by label)")
    if gathered.no_map:
        total = sum(gathered.no_map.values())
        notes.append(
            f"{total} image(s) have no stored map of their {'predicted class' if by == 'pred' else 'label'} "
            f"(not among the run's --targets), in {len(gathered.no_map)} class(es): not audited"
        )
    if gathered.unreadable:
        total = sum(gathered.unreadable.values())
        notes.append(
            f"{total} image(s) whose map reads NaN (a row never written or a damaged chunk), in {len(gathered.unreadable)} class(es): not audited"
        )
    return notes


def _why_no_images(gathered: Gathered, c: int, by: str) -> str:
    if gathered.no_map.get(c):
        return (
            f"none of its {gathered.no_map[c]} image(s) has a stored map of it (the run's --targets did not include it)"
        )
    if gathered.unreadable.get(c):
        return f"the maps of all {gathered.unreadable[c]} of its image(s) read NaN"
    return f"no image is {'predicted as' if by == 'pred' else 'labelled'} it"
