"""``cdam export-fiftyone``: a run as a FiftyOne dataset folder, for users who keep FiftyOne's viewer.

The folder is FiftyOne's JSON dataset format (``samples.json`` + ``metadata.json`` + media), imported with
``fo.Dataset.from_dir("OUT", fo.types.FiftyOneDataset)``. FiftyOne is not needed to write it.

- ``data/<n>.png``: each image as the model saw it (the run's resize and crop), the frame every map covers;
- ``heatmaps/<n>-<field>.png``: each stored map (target slot, and the attention) at token resolution,
  the file a FiftyOne ``Heatmap`` points to (FiftyOne stretches it over the image). Maps are signed, PNGs
  are not: a pixel ``p`` (``range`` [0, 255]) stands for ``(p / 127.5 - 1) * s``, with ``s`` (the field
  ``<field>_scale``) the map's largest |value|, so 0 is the middle grey and each map uses its whole range;
- ``heatmaps/<n>-<field>.npy``: the same map, float32, exact (for analysis outside FiftyOne);
- per sample: ``key``, ``row``, ``shard``, ``ground_truth`` and ``prediction`` (Classification),
  ``cdam_<k>`` (Heatmap of target slot k) with ``cdam_<k>_target`` (its class or concept name),
  ``attention`` (Heatmap), and, when ``cdam audit`` has run, ``audit_cluster``, ``audit_x``, ``audit_y``,
  ``audit_score`` and tags ``cluster-<k>`` and ``audit-flagged``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
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
    (out / "heatmaps").mkdir(exist_ok=True)
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
                sample = _sample(run, out, n, record, slots, heads, model_view, catalog.class_names, audit_by_key.get(record["key"]), counts)
                if sample is not None:
                    samples.append(sample)
                progress.update(1)
    counts["samples"] = len(samples)
    (out / "samples.json").write_text(json.dumps({"samples": samples}))
    info = {"cdam_run": run.url, "classes": catalog.class_names, "patch_grid": list(run.grid), "targets": run.attrs.get("targets"),
            "maps": "heatmaps at token resolution over the model's input crop; pixel p stands for (p / 127.5 - 1) * <field>_scale; exact float32 maps in heatmaps/*.npy"}
    (out / "metadata.json").write_text(json.dumps({"name": f"cdam-{Path(run.url).name}", "media_type": "image", "info": info}, indent=2))
    return counts


def _sample(run: Run, out: Path, n: int, record: dict[str, Any], slots: np.ndarray, heads: np.ndarray, model_view: ModelView,
            class_names: list[str], audit: dict[str, Any] | None, counts: dict[str, int]) -> dict[str, Any] | None:
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
        "prediction": {"_cls": "Classification", "label": class_names[record["pred"]], "confidence": record["pred_prob"]},
    }
    if record["label"] is not None and 0 <= record["label"] < len(class_names):
        sample["ground_truth"] = {"_cls": "Classification", "label": class_names[record["label"]]}
    fields = [(f"cdam_{k}", slots[k], name) for k, name in enumerate(record["target_names"])] + [("attention", heads, None)]
    for field, values, target in fields:
        if not np.isfinite(values).any():
            counts["missing_maps"] += 1
            continue
        stem = out.resolve() / "heatmaps" / f"{n:07d}-{field}"
        np.save(stem.with_suffix(".npy"), values.astype(np.float32))
        scale = symmetric_scale(values) or 1.0
        pixels = np.rint((np.clip(np.nan_to_num(values) / scale, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(stem.with_suffix(".png"))
        sample[field] = {"_cls": "Heatmap", "map_path": str(stem.with_suffix(".png")), "range": [0, 255]}
        sample[f"{field}_scale"] = scale
        if target is not None:
            sample[f"{field}_target"] = target
    if audit is not None:
        sample.update({f"audit_{name}": audit[name] for name in ("cluster", "x", "y", "score")})
        sample["tags"].append(f"cluster-{audit['cluster']}")
        if audit["flagged"]:
            sample["tags"].append("audit-flagged")
    return sample


def _audit_by_key(catalog: Catalog) -> dict[str, dict[str, Any]]:
    """The audit's row of each image (its class as the audit grouped it), empty without an audit."""
    if catalog.audit is None:
        return {}
    rows = catalog.audit.images.select(["key", "cluster", "x", "y", "score", "flagged"]).to_pylist()
    return {row.pop("key"): row for row in rows}



