"""The Zarr v3 layout of ``DEST/cdam.zarr``: array names, dimensions, dtypes and chunking.

Every WebDataset shard owns a fixed block of ``rows_per_shard`` rows along the ``image`` axis
(shard i: rows ``i * rows_per_shard`` up to the next block). Chunks hold ``CHUNK_ROWS`` rows and
``rows_per_shard`` is a multiple of it, so every chunk object belongs to exactly one shard and
has exactly one writer. Rows never written (errors, padding) read as the fill value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CHUNK_ROWS = 16
FLOAT_FILL = float("nan")
INT_FILL = -2  # target_class of an unwritten row; -1 marks a concept slot
HEAD_GROUP = "head"
"""Sub-group written with the basis: the linear head, ``weight`` (class, feature) and ``bias`` (class), float32."""
DERIVED_GROUP = "derived"
"""Sub-group of maps derived from the basis later: ``derived/NAME/cdam`` and ``derived/NAME/target_class``."""


@dataclass(frozen=True)
class ArraySpec:
    name: str
    dims: tuple[str, ...]
    dtype: str  # "maps" for the run's storage dtype of maps


def array_specs(store_basis: bool) -> list[ArraySpec]:
    """The arrays of a run, in the order they are documented."""
    specs = [
        ArraySpec("cdam", ("image", "target", "y", "x"), "maps"),
        ArraySpec("target_class", ("image", "target"), "int32"),
        ArraySpec("attention", ("image", "head", "y", "x"), "maps"),
        ArraySpec("embedding", ("image", "feature"), "float32"),
        ArraySpec("logits", ("image", "class"), "float32"),
    ]
    if store_basis:
        specs.append(ArraySpec("basis", ("image", "feature", "y", "x"), "maps"))
    return specs


@dataclass(frozen=True)
class Layout:
    """Sizes that fix every array's shape."""

    n_shards: int
    rows_per_shard: int
    n_targets: int
    n_heads: int
    grid: tuple[int, int]
    embed_dim: int
    n_classes: int
    maps_dtype: str  # "float32" or "float16"
    store_basis: bool

    def __post_init__(self) -> None:
        if self.rows_per_shard % CHUNK_ROWS:
            raise ValueError(f"rows_per_shard ({self.rows_per_shard}) must be a multiple of {CHUNK_ROWS}")

    @property
    def n_rows(self) -> int:
        return self.n_shards * self.rows_per_shard

    def shape(self, spec: ArraySpec) -> tuple[int, ...]:
        sizes = {
            "image": self.n_rows,
            "target": self.n_targets,
            "head": self.n_heads,
            "y": self.grid[0],
            "x": self.grid[1],
            "feature": self.embed_dim,
            "class": self.n_classes,
        }
        return tuple(sizes[d] for d in spec.dims)

    def chunks(self, spec: ArraySpec) -> tuple[int, ...]:
        return (CHUNK_ROWS, *self.shape(spec)[1:])

    def dtype(self, spec: ArraySpec) -> np.dtype:
        return np.dtype(self.maps_dtype if spec.dtype == "maps" else spec.dtype)

    def fill_value(self, spec: ArraySpec) -> float | int:
        return INT_FILL if np.issubdtype(self.dtype(spec), np.integer) else FLOAT_FILL

    def bytes_per_image(self) -> int:
        """Uncompressed bytes one image's row takes over all arrays."""
        return sum(
            math.prod(self.shape(spec)[1:]) * self.dtype(spec).itemsize for spec in array_specs(self.store_basis)
        )

    def first_row(self, shard_index: int) -> int:
        return shard_index * self.rows_per_shard


def rows_per_shard_for(max_samples: int) -> int:
    """The smallest multiple of CHUNK_ROWS that holds the largest shard."""
    return max(CHUNK_ROWS, -(-max_samples // CHUNK_ROWS) * CHUNK_ROWS)
