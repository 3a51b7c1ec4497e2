"""``cdam export-fiftyone``: a run as a FiftyOne dataset folder, for users who keep FiftyOne's viewer.

The folder is FiftyOne's JSON dataset format (``samples.json`` + ``metadata.json`` + media), imported with
``fo.Dataset.from_dir("OUT", fo.types.FiftyOneDataset)``. FiftyOne is not needed to write it. Every path in
it is relative to the folder (FiftyOne's importer resolves ``filepath`` against the folder it imports), so
the folder can be moved or copied to another machine.

- ``data/<n>.png``: each image as the model saw it (the run's resize and crop), the frame every map covers;
- per sample: ``key``, ``row``, ``shard``, ``ground_truth`` and ``prediction`` (Classification),
  ``cdam_<k>`` (Heatmap of target slot k) with ``cdam_<k>_target`` (its class or concept name),
  ``attention`` (Heatmap), and, when ``cdam audit`` has run, ``audit_cluster``, ``audit_x``, ``audit_y``,
  ``audit_score`` and tags ``cluster-<k>`` and ``audit-flagged``.

Heatmaps are stored in the samples (``Heatmap.map``, FiftyOne's serialised array: base64 of zlib-compressed
``.npy`` bytes) as the run's signed float32 map at token resolution, with ``range`` [-s, s], s its largest
|value| (FiftyOne stretches the map over the image). FiftyOne's App paints a map value of exactly 0 not at
all and, colouring by field, a value v with opacity |v| / s: no relevance shows the image through, and
red-against-blue needs a diverging colorscale with "color by value". The attention (mean over heads) is
stored less its minimum, range [0, its largest value], as the dashboard shows it. NaN (maps not written)
is left out of the sample; a NaN token of a written map is stored as 0.
"""

from __future__ import annotations

import base64
import io
import json
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from cdam_worker.reading import Run, RunError
from cdam_worker.views.catalog import Catalog
from cdam_worker.views.colormap import symmetric_scale
from cdam_worker.views.render import ModelView

CHUNK = 256
METADATA_COLUMNS = ["key", "row", "shard", "label", "pred", "pred_prob", "targets", "target_names"]


def export_fiftyone(run: Run, out: Path) -> dict[str, int]:
    """Write the FiftyOne dataset folder of ``run`` into ``out`` (created; must be empty or absent).

    Returns counts: samples written, images that could not be read (left out), maps missing (NaN, left out).
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise RunError(f"{out} is not empty: give a new folder for the FiftyOne export")
    (out / "data").mkdir(parents=True, exist_ok=True)
    catalog = Catalog(run)
    model_view = ModelView(run.attrs["data_config"])
    audit_by_key = _audit_by_key(catalog)
    table = run.metadata.to_table(columns=METADATA_COLUMNS).sort_by("row")
    samples: list[dict[str, Any]] = []
    counts = {"samples": 0, "unreadable_images": 0, "missing_maps": 0}
    with tqdm(total=table.num_rows, desc="export-fiftyone", unit="image", file=sys.stderr) as progress:
        for start in range(0, table.num_rows, CHUNK):
            records = table.slice(start, CHUNK).to_pylist()
            rows = np.asarray([r["row"] for r in records], dtype=np.int64)
            maps = run.read_rows("cdam", rows).astype(np.float32)
            attention = run.read_rows("attention", rows).astype(np.float32).mean(axis=1)
            for n, (record, slots, heads) in enumerate(zip(records, maps, attention), start=start):
                sample = _sample(
                    run,
                    out,
                    n,
                    record,
                    slots,
                    heads,
                    model_view,
                    catalog.class_names,
                    audit_by_key.get(record["key"]),
                    counts,
                )
                if sample is not None:
                    samples.append(sample)
                progress.update(1)
    counts["samples"] = len(samples)
    (out / "samples.json").write_text(json.dumps({"samples": samples}))
    info = {
        "cdam_run": run.url,
        "classes": catalog.class_names,
        "patch_grid": list(run.grid),
        "targets": run.attrs.get("targets"),
        "maps": "Heatmap.map: the signed float32 map at token resolution over the model's input crop, range [-s, s] (s its largest |value|); attention less its minimum",
    }
    (out / "metadata.json").write_text(
        json.dumps({"name": f"cdam-{Path(run.url).name}", "media_type": "image", "info": info}, indent=2)
    )
    return counts


def _sample(
    run: Run,
    out: Path,
    n: int,
    record: dict[str, Any],
    slots: np.ndarray,
    heads: np.ndarray,
    model_view: ModelView,
    class_names: list[str],
    audit: dict[str, Any] | None,
    counts: dict[str, int],
) -> dict[str, Any] | None:
    try:
        image = model_view(run.image(record["key"])).convert("RGB")
    except RunError as error:
        print(f"note: left out: {error}", file=sys.stderr)
        counts["unreadable_images"] += 1
        return None
    image_path = f"data/{n:07d}.png"
    image.save(out / image_path)
    sample: dict[str, Any] = {
        "filepath": image_path,
        "tags": [],
        "key": record["key"],
        "row": record["row"],
        "shard": record["shard"],
        "prediction": {
            "_cls": "Classification",
            "label": class_names[record["pred"]],
            "confidence": record["pred_prob"],
        },
    }
    if record["label"] is not None and 0 <= record["label"] < len(class_names):
        sample["ground_truth"] = {"_cls": "Classification", "label": class_names[record["label"]]}
    attention = heads - np.nanmin(heads) if np.isfinite(heads).any() else heads
    fields = [(f"cdam_{k}", slots[k], name) for k, name in enumerate(record["target_names"])] + [
        ("attention", attention, None)
    ]
    for field, values, target in fields:
        if not np.isfinite(values).any():
            counts["missing_maps"] += 1
            continue
        sample[field] = heatmap(values, signed=field != "attention")
        if target is not None:
            sample[f"{field}_target"] = target
    if audit is not None:
        sample.update({f"audit_{name}": audit[name] for name in ("cluster", "x", "y", "score")})
        sample["tags"].append(f"cluster-{audit['cluster']}")
        if audit["flagged"]:
            sample["tags"].append("audit-flagged")
    return sample


def heatmap(values: np.ndarray, signed: bool = True) -> dict[str, Any]:
    """FiftyOne's JSON of a ``Heatmap`` holding ``values`` (float32, NaN stored as 0) with the range that keeps
    0 transparent: [-s, s] (``signed``) or [0, s], s the largest |value| (1 for an all-zero map)."""
    values = np.nan_to_num(values.astype(np.float32), nan=0.0)
    scale = symmetric_scale(values) or 1.0
    with io.BytesIO() as buffer:
        np.save(buffer, values, allow_pickle=False)
        encoded = base64.b64encode(zlib.compress(buffer.getvalue())).decode("ascii")
    return {
        "_cls": "Heatmap",
        "map": {"$binary": {"base64": encoded, "subType": "00"}},
        "range": [-scale if signed else 0.0, scale],
    }


def _audit_by_key(catalog: Catalog) -> dict[str, dict[str, Any]]:
    """The audit's row of each image (its class as the audit grouped it), empty without an audit."""
    if catalog.audit is None:
        return {}
    rows = catalog.audit.images.select(["key", "cluster", "x", "y", "score", "flagged"]).to_pylist()
    return {row.pop("key"): row for row in rows}
