"""Gather what the audit reads from a run: each image's class, its map of that class, its competitors' maps.

One pass over the run's rows in Zarr order (chunk by chunk, whatever the classes), so a 50,000-image
run is read once: block by block here, or one Ray task per block on a cluster (the driver concatenates the
blocks in order, so the result is the same). An image is audited for its predicted class (``by="pred"``) or its label
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
from cdam_worker.reading.cluster import run_units

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


@dataclass(frozen=True)
class _Block:
    """Up to ``STEP_ROWS`` images to read: their positions in the index, rows and audited classes."""

    positions: np.ndarray
    rows: np.ndarray
    audited: np.ndarray


@dataclass
class _BlockMaps:
    """What one block yields: the images kept (positions), their class maps and features, and what was left out."""

    positions: np.ndarray
    class_maps: np.ndarray
    features: ImageFeatures
    no_map: Counter
    unreadable: Counter
    rows_read: int


def gather(
    run: Run,
    by: str,
    classes: set[int] | None,
    progress: Callable[[int], None] = lambda _rows: None,
    address: str | None = None,
) -> Gathered:
    """Read the maps of every image to audit (restricted to ``classes`` when given), computing features on the way:
    block by block here, or one Ray task per block on the cluster at ``address`` (or RAY_ADDRESS)."""
    index = run.index
    rows = index.column("row").to_numpy().astype(np.int64)
    keys = np.asarray(index.column("key").to_pylist(), dtype=object)
    labels = index.column("label").fill_null(-1).to_numpy().astype(np.int64)
    audited = labels.copy() if by == "label" else index.column("pred").to_numpy().astype(np.int64)
    no_label = int((audited < 0).sum()) if by == "label" else 0
    wanted = audited >= 0
    if classes is not None:
        wanted &= np.isin(audited, sorted(classes))
    positions = np.flatnonzero(wanted)
    blocks = [
        _Block(part, rows[part], audited[part])
        for start in range(0, len(positions), STEP_ROWS)
        for part in [positions[start : start + STEP_ROWS]]
    ]
    parts = run_units(_read_block, blocks, run, address=address, done=lambda part: progress(part.rows_read))
    gh, gw = run.grid
    kept = np.concatenate([p.positions for p in parts]) if parts else np.zeros(0, dtype=np.int64)
    class_maps = np.concatenate([p.class_maps for p in parts]) if parts else np.zeros((0, gh, gw), dtype=np.float32)
    features = (
        ImageFeatures.concatenate([p.features for p in parts])
        if parts
        else image_features(class_maps, np.zeros((0, 0, gh, gw)))
    )
    return Gathered(
        keys=keys[kept],
        rows=rows[kept],
        classes=audited[kept],
        labels=labels[kept],
        class_maps=class_maps,
        features=features,
        no_map=sum((p.no_map for p in parts), Counter()),
        unreadable=sum((p.unreadable for p in parts), Counter()),
        no_label=no_label,
    )


def _read_block(block: _Block, run: Run, _shared: None) -> _BlockMaps:
    """One block's class maps and features (here or as a Ray task)."""
    target_class = run.read_rows("target_class", block.rows).astype(np.int64)  # (m, T)
    maps = run.read_rows("cdam", block.rows).astype(np.float32)  # (m, T, gh, gw)
    audited = block.audited
    is_class = target_class == audited[:, None]
    has_map = is_class.any(axis=1)
    slot = is_class.argmax(axis=1)
    class_maps = maps[np.arange(len(block.rows)), slot]
    readable = np.isfinite(class_maps).all(axis=(1, 2))
    ok = has_map & readable
    is_rival = (target_class >= 0) & ~is_class
    rivals = np.where(is_rival[:, :, None, None], maps, np.nan)
    return _BlockMaps(
        positions=block.positions[ok],
        class_maps=class_maps[ok],
        features=image_features(class_maps[ok], rivals[ok]),
        no_map=Counter(audited[~has_map].tolist()),
        unreadable=Counter(audited[has_map & ~readable].tolist()),
        rows_read=len(block.rows),
    )
