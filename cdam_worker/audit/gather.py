"""Gather what the audit reads from a run: each image's class, its map of that class, its competitors' maps.

One pass over the run's rows in Zarr order (chunk by chunk, whatever the classes), so a 50,000-image
run is read once. An image is audited for its predicted class (``by="pred"``) or its label
(``by="label"``); it is left out, and counted, when that class has no stored map for it (the run's
``--targets`` did not include it) or when its map reads NaN (a row never written, a damaged chunk).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from cdam_worker.audit.features import ImageFeatures, image_features
from cdam_worker.reading import Run

STEP_ROWS = 1024
"""Rows read per step (64 Zarr chunks)."""


@dataclass
class Gathered:
    """The audited images of a run (in row order) with their features, and what was left out."""

    keys: np.ndarray  # (n,) object
    rows: np.ndarray  # (n,) int64
    classes: np.ndarray  # (n,) int64: the class each image is audited for
    labels: np.ndarray  # (n,) int64, -1 where the image has no label
    class_maps: np.ndarray  # (n, gh, gw) float32: the stored map of the audited class
    features: ImageFeatures
    no_map: Counter = field(default_factory=Counter)  # class -> images without a stored map of it
    unreadable: Counter = field(default_factory=Counter)  # class -> images whose map reads NaN
    no_label: int = 0  # images left out with by="label" because they have no label


def gather(
    run: Run, by: str, classes: set[int] | None, progress: Callable[[int], None] = lambda _rows: None
) -> Gathered:
    """Read the maps of every image to audit (restricted to ``classes`` when given), computing features on the way."""
    index = run.index
    rows = index.column("row").to_numpy().astype(np.int64)
    keys = np.asarray(index.column("key").to_pylist(), dtype=object)
    labels = index.column("label").fill_null(-1).to_numpy().astype(np.int64)
    audited = labels.copy() if by == "label" else index.column("pred").to_numpy().astype(np.int64)
    no_label = int((audited < 0).sum()) if by == "label" else 0
    wanted = audited >= 0
    if classes is not None:
        wanted &= np.isin(audited, sorted(classes))
    keep_positions, keep_maps, keep_features = [], [], []
    no_map: Counter = Counter()
    unreadable: Counter = Counter()
    positions = np.flatnonzero(wanted)
    for start in range(0, len(positions), STEP_ROWS):
        part = positions[start : start + STEP_ROWS]
        target_class = run.read_rows("target_class", rows[part]).astype(np.int64)  # (m, T)
        maps = run.read_rows("cdam", rows[part]).astype(np.float32)  # (m, T, gh, gw)
        progress(len(part))
        is_class = target_class == audited[part, None]
        has_map = is_class.any(axis=1)
        no_map.update(audited[part][~has_map].tolist())
        slot = is_class.argmax(axis=1)
        class_maps = maps[np.arange(len(part)), slot]
        readable = np.isfinite(class_maps).all(axis=(1, 2))
        unreadable.update(audited[part][has_map & ~readable].tolist())
        ok = has_map & readable
        is_rival = (target_class >= 0) & ~is_class
        rivals = np.where(is_rival[:, :, None, None], maps, np.nan)
        keep_positions.append(part[ok])
        keep_maps.append(class_maps[ok])
        keep_features.append(image_features(class_maps[ok], rivals[ok]))
    gh, gw = run.grid
    kept = np.concatenate(keep_positions) if keep_positions else np.zeros(0, dtype=np.int64)
    class_maps = np.concatenate(keep_maps) if keep_maps else np.zeros((0, gh, gw), dtype=np.float32)
    features = (
        ImageFeatures.concatenate(keep_features)
        if keep_features
        else image_features(class_maps, np.zeros((0, 0, gh, gw)))
    )
    return Gathered(
        keys=keys[kept],
        rows=rows[kept],
        classes=audited[kept],
        labels=labels[kept],
        class_maps=class_maps,
        features=features,
        no_map=no_map,
        unreadable=unreadable,
        no_label=no_label,
    )
