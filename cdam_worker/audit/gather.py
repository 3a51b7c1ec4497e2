"""Gather what the audit reads from a run: each image's class, its map of that class, its competitors' maps, and
every stored map's evidence distribution (so that ``cues.py`` can read a class's evidence in other classes' images).

One pass over the run's rows in Zarr order (chunk by chunk, whatever the classes), so a 50,000-image
run is read once: block by block here, or one Ray task per block on a cluster (the driver concatenates the
blocks in order, so the result is the same). The per-image arrays live on local disk (``spill.py``), so the
driver's memory holds the blocks and, later, one class's rows at a time. An image is audited for its predicted class (``by="pred"``) or its label
(``by="label"``); it is left out, and counted, when that class has no stored map for it (the run's
``--targets`` did not include it) or when its map reads NaN (a row never written, a damaged chunk).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from cdam_worker.audit.features import ImageFeatures, image_features, target_shares
from cdam_worker.audit.spill import Spill, hand_back_freed_memory
from cdam_worker.reading import Run
from cdam_worker.reading.cluster import each_result

STEP_ROWS = 1024
"""Rows read per step (64 Zarr chunks)."""
TRIM_BLOCKS = 16
"""The memory freed by reading is handed back to the system every this many blocks."""


@dataclass
class Gathered:
    """The audited images of a run, grouped by audited class (in row order within a class, so that a class's images
    are one stretch of the disk-backed arrays), with their features, and what was left out; the class maps, the
    features and the stored targets are disk-backed (``spill``: ``release`` after reading a class)."""

    keys: np.ndarray  # (n,) object
    rows: np.ndarray  # (n,) int64
    classes: np.ndarray  # (n,) int64: the class each image is audited for
    labels: np.ndarray  # (n,) int64, -1 where the image has no label
    class_maps: np.ndarray  # (n, gh, gw) float32: the stored map of the audited class
    features: ImageFeatures
    target_classes: np.ndarray  # (n, T) int64: the classes of the image's stored maps (-1: slot unused or unreadable)
    target_shares: np.ndarray  # (n, T, gh, gw) float16: each stored map's evidence distribution (``target_shares``)
    no_map: Counter = field(default_factory=Counter)  # class -> images without a stored map of it
    unreadable: Counter = field(default_factory=Counter)  # class -> images whose map reads NaN
    no_label: int = 0  # images left out with by="label" because they have no label
    spill: Spill = field(default_factory=Spill)

    def in_row_order(self, selected: np.ndarray) -> np.ndarray:
        """The positions of the images ``selected`` (a bool mask over the gathered images), in row order."""
        positions = np.flatnonzero(selected)
        return positions[np.argsort(self.rows[positions], kind="stable")]

    def release(self) -> None:
        """Hand back the pages read of the disk-backed arrays (``spill.py``)."""
        self.spill.release()


@dataclass(frozen=True)
class _Block:
    """Up to ``STEP_ROWS`` images to read: their rows and audited classes."""

    rows: np.ndarray
    audited: np.ndarray


@dataclass
class _BlockMaps:
    """What one block yields: which of its images are kept, their class maps and features, and what was left out."""

    ok: np.ndarray
    class_maps: np.ndarray
    features: ImageFeatures
    targets: dict[str, np.ndarray]  # target_classes, target_shares (as in ``Gathered``) of the kept images
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
    block by block here, or one Ray task per block on the cluster at ``address`` (or RAY_ADDRESS); the arrays are
    written to a new ``Spill`` in TMPDIR."""
    index = run.index
    rows = index.column("row").to_numpy().astype(np.int64)
    keys = np.asarray(index.column("key").to_pylist(), dtype=object)
    labels = index.column("label").fill_null(-1).to_numpy().astype(np.int64)
    audited = labels.copy() if by == "label" else index.column("pred").to_numpy().astype(np.int64)
    hand_back_freed_memory()  # what reading the metadata tables left behind
    no_label = int((audited < 0).sum()) if by == "label" else 0
    wanted = audited >= 0
    if classes is not None:
        wanted &= np.isin(audited, sorted(classes))
    positions = np.flatnonzero(wanted)
    blocks = [
        _Block(rows[part], audited[part])
        for start in range(0, len(positions), STEP_ROWS)
        for part in [positions[start : start + STEP_ROWS]]
    ]
    by_class = np.argsort(audited[positions], kind="stable")  # slot i holds the image at positions[by_class[i]]
    slot_of = np.empty_like(by_class)
    slot_of[by_class] = np.arange(len(by_class))
    spill = Spill()
    slots = _Slots(len(positions), spill)
    no_map: Counter = Counter()
    unreadable: Counter = Counter()
    for b, part in each_result(_read_block, blocks, run, address=address):
        slots.put(slot_of[b * STEP_ROWS + np.flatnonzero(part.ok)], part.class_maps, part.features, part.targets)
        no_map.update(part.no_map)
        unreadable.update(part.unreadable)
        spill.release()
        if b % TRIM_BLOCKS == 0:
            hand_back_freed_memory()
        progress(part.rows_read)
    kept = positions[by_class][slots.filled]
    class_maps, features, targets = slots.kept(run.grid)
    return Gathered(
        keys=keys[kept],
        rows=rows[kept],
        classes=audited[kept],
        labels=labels[kept],
        class_maps=class_maps,
        features=features,
        **targets,
        no_map=no_map,
        unreadable=unreadable,
        no_label=no_label,
        spill=spill,
    )


class _Slots:
    """The blocks' class maps and features written in place, one slot per image to read (grouped by class; the blocks
    may come in any order), on disk (``spill``), so that the gathered arrays are never held in memory."""

    def __init__(self, n: int, spill: Spill) -> None:
        self.n = n
        self.spill = spill
        self.filled = np.zeros(n, dtype=bool)
        self.class_maps: np.ndarray | None = None
        self.features: dict[str, np.ndarray] = {}
        self.targets: dict[str, np.ndarray] = {}

    def put(
        self, slots: np.ndarray, class_maps: np.ndarray, features: ImageFeatures, targets: dict[str, np.ndarray]
    ) -> None:
        if self.class_maps is None:
            self.class_maps = self._empty_like(class_maps, self.n)
            self.features = {name: self._empty_like(value, self.n) for name, value in vars(features).items()}
            self.targets = {name: self._empty_like(value, self.n) for name, value in targets.items()}
        self.class_maps[slots] = class_maps
        for name, value in [*vars(features).items(), *targets.items()]:
            (self.features if name in self.features else self.targets)[name][slots] = value
        self.filled[slots] = True

    def kept(self, grid: tuple[int, int]) -> tuple[np.ndarray, ImageFeatures, dict[str, np.ndarray]]:
        """The filled slots' class maps, features and stored targets, in slot order (copied, block by block, into
        new disk-backed arrays when some slots stayed empty)."""
        if self.class_maps is None:
            empty = np.zeros((0, *grid), dtype=np.float32)
            targets = {
                "target_classes": np.zeros((0, 0), dtype=np.int64),
                "target_shares": np.zeros((0, 0, *grid), dtype=np.float16),
            }
            return empty, image_features(empty, np.zeros((0, 0, *grid))), targets
        if self.filled.all():
            return self.class_maps, ImageFeatures(**self.features), self.targets
        maps = self._compacted(self.class_maps)
        for arrays in (self.features, self.targets):
            for name in list(arrays):
                arrays[name] = self._compacted(arrays[name])
        return maps, ImageFeatures(**self.features), self.targets

    def _empty_like(self, value: np.ndarray, n: int) -> np.ndarray:
        return self.spill.empty((n, *value.shape[1:]), value.dtype)

    def _compacted(self, array: np.ndarray) -> np.ndarray:
        """The filled slots of ``array``, in a new disk-backed array."""
        filled = np.flatnonzero(self.filled)
        out = self._empty_like(array, len(filled))
        for start in range(0, len(filled), STEP_ROWS * 16):
            out[start : start + STEP_ROWS * 16] = array[filled[start : start + STEP_ROWS * 16]]
            self.spill.release()
        return out


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
    stored = (target_class >= 0) & np.isfinite(maps).all(axis=(2, 3))
    return _BlockMaps(
        ok=ok,
        class_maps=class_maps[ok],
        features=image_features(class_maps[ok], rivals[ok]),
        targets={
            "target_classes": np.where(stored, target_class, -1)[ok],
            "target_shares": target_shares(maps[ok], stored[ok]),
        },
        no_map=Counter(audited[~has_map].tolist()),
        unreadable=Counter(audited[has_map & ~readable].tolist()),
        rows_read=len(block.rows),
    )
