"""Arrays and tables out: the Zarr store, per-shard Parquet files and completion markers of a run.

Output tree under DEST (local folder or S3 prefix)::

    cdam.zarr/                 Zarr v3 group (schemas/zarr_layout.py)
    metadata/NNNNNN-<shard>.parquet   one row per explained image (schemas/metadata.py)
    errors/NNNNNN-<shard>.parquet     one row per sample that could not be explained
    markers/NNNNNN.json        written last, once the shard's arrays and tables are durable
    manifest.json              run settings, shard list, and (when complete) per-shard checksums
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.codecs import ZstdCodec

from cdam_worker.storage import Storage
from schemas import CHUNK_ROWS, ERRORS_SCHEMA, HEAD_GROUP, METADATA_SCHEMA, Layout, array_specs

ZARR_PATH = "cdam.zarr"


def shard_file_stem(shard_index: int, shard_name: str) -> str:
    return f"{shard_index:06d}-{shard_name}"


def marker_path(shard_index: int) -> str:
    return f"markers/{shard_index:06d}.json"


def create_zarr(storage: Storage, layout: Layout, attributes: dict[str, Any], head: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """Create the group and its (empty) arrays; only the driver writes Zarr metadata.

    ``head`` (weight (C, D), bias (C)) is the model's linear head, stored with the basis as ``head/``: the class
    directions that turn the basis into the map of any class later, without the model.
    """
    group = zarr.open_group(store=storage.zarr_store(ZARR_PATH), mode="w", zarr_format=3, attributes=attributes)
    if head is not None:
        head_group = group.create_group(HEAD_GROUP)
        for name, values, dims in (("weight", head[0], ("class", "feature")), ("bias", head[1], ("class",))):
            values = np.ascontiguousarray(values, dtype=np.float32)
            head_group.create_array(name, data=values, chunks=values.shape, dimension_names=dims, compressors=ZstdCodec(level=3))
    for spec in array_specs(layout.store_basis):
        group.create_array(
            spec.name,
            shape=layout.shape(spec),
            chunks=layout.chunks(spec),
            dtype=layout.dtype(spec),
            fill_value=layout.fill_value(spec),
            dimension_names=spec.dims,
            compressors=ZstdCodec(level=3),
        )


def open_zarr(storage: Storage, mode: str = "r+") -> zarr.Group:
    return zarr.open_group(store=storage.zarr_store(ZARR_PATH, read_only=mode == "r"), mode=mode, zarr_format=3)


@dataclass
class ExplainedRow:
    """Everything stored for one explained image (numpy, on the CPU)."""

    local_row: int  # index of the sample within its shard
    key: str
    label: int | None
    width: int
    height: int
    sample_json: str | None
    arrays: dict[str, np.ndarray]  # one entry per Zarr array, without the image axis
    table: dict[str, Any]  # the metadata columns computed from the model outputs


@dataclass
class ShardSummary:
    """What a shard's completion marker records."""

    shard: str
    shard_index: int
    url: str
    n_samples: int
    n_images: int
    n_errors: int
    rows_checked: int  # rows from the block start covered by the array checksums
    checksums: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode()


def block_checksums(group: zarr.Group, first_row: int, n_rows: int, names: list[str]) -> dict[str, str]:
    """sha256 of each array's values over rows [first_row, first_row + n_rows) (C order)."""
    return {name: hashlib.sha256(np.ascontiguousarray(group[name][first_row : first_row + n_rows]).tobytes()).hexdigest() for name in names}


class ShardWriter:
    """Writes one shard's block: Zarr chunks as they fill, the Parquet tables and the marker at the end.

    Rows arrive in shard order; a chunk is written once no later row can fall into it, so the
    writer holds at most one chunk of rows per array.
    """

    def __init__(self, storage: Storage, group: zarr.Group, layout: Layout, shard_index: int, shard: str, url: str, n_samples: int, run_id: str) -> None:
        if n_samples > layout.rows_per_shard:
            raise ValueError(f"shard {shard} has {n_samples} samples but the run reserves {layout.rows_per_shard} rows per shard")
        self.storage, self.layout = storage, layout
        self.shard_index, self.shard, self.url, self.n_samples, self.run_id = shard_index, shard, url, n_samples, run_id
        self.first_row = layout.first_row(shard_index)
        self.names = [spec.name for spec in array_specs(layout.store_basis)]
        self.arrays = {name: group[name] for name in self.names}  # opened once: each open reads zarr.json
        self.hashes = {name: hashlib.sha256() for name in self.names}
        self.rows: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []
        self.chunk_index = 0  # chunk of the block being filled
        self.buffer = self._empty_chunk()
        self.rows_flushed = 0

    def add(self, row: ExplainedRow) -> None:
        """Record an explained image at its row of the shard's block."""
        self._advance_to(row.local_row)
        offset = row.local_row - self.chunk_index * CHUNK_ROWS
        for name in self.names:
            self.buffer[name][offset] = row.arrays[name]
        self.rows.append(
            {
                "key": row.key,
                "shard": self.shard,
                "shard_index": self.shard_index,
                "row": self.first_row + row.local_row,
                "label": row.label,
                "width": row.width,
                "height": row.height,
                "sample_json": row.sample_json,
                "run_id": self.run_id,
                **row.table,
            }
        )

    def add_error(self, key: str | None, reason: str) -> None:
        self.errors.append({"shard": self.shard, "shard_index": self.shard_index, "key": key, "reason": reason, "run_id": self.run_id})

    def finish(self) -> ShardSummary:
        """Flush the last chunk, write the tables, then the completion marker."""
        if self.rows:
            self._flush()
        stem = shard_file_stem(self.shard_index, self.shard)
        checksums = {name: digest.hexdigest() for name, digest in self.hashes.items()}
        checksums["metadata"] = self._put_table(f"metadata/{stem}.parquet", self.rows, METADATA_SCHEMA)
        if self.errors:
            checksums["errors"] = self._put_table(f"errors/{stem}.parquet", self.errors, ERRORS_SCHEMA)
        else:
            self.storage.delete(f"errors/{stem}.parquet")  # a stale file from an earlier attempt
        summary = ShardSummary(self.shard, self.shard_index, self.url, self.n_samples, len(self.rows), len(self.errors), self.rows_flushed, checksums)
        self.storage.put(marker_path(self.shard_index), summary.to_json())
        return summary

    def _empty_chunk(self) -> dict[str, np.ndarray]:
        chunk = {}
        for spec in array_specs(self.layout.store_basis):
            chunk[spec.name] = np.full(self.layout.chunks(spec), self.layout.fill_value(spec), dtype=self.layout.dtype(spec))
        return chunk

    def _advance_to(self, local_row: int) -> None:
        target_chunk = local_row // CHUNK_ROWS
        if target_chunk < self.chunk_index:
            raise ValueError(f"shard {self.shard}: rows must arrive in order (row {local_row} after chunk {self.chunk_index})")
        while self.chunk_index < target_chunk:
            if self.rows and self.rows[-1]["row"] >= self.first_row + self.chunk_index * CHUNK_ROWS:
                self._flush()
            else:  # a chunk with no explained row stays unwritten, but its fill values count in the checksum
                self._hash_chunk(self._empty_chunk())
                self.rows_flushed += CHUNK_ROWS
            self.chunk_index += 1
            self.buffer = self._empty_chunk()

    def _flush(self) -> None:
        start = self.first_row + self.chunk_index * CHUNK_ROWS
        for name, array in self.arrays.items():
            array[start : start + CHUNK_ROWS] = self.buffer[name]
        self._hash_chunk(self.buffer)
        self.rows_flushed += CHUNK_ROWS

    def _hash_chunk(self, chunk: dict[str, np.ndarray]) -> None:
        for name in self.names:
            self.hashes[name].update(np.ascontiguousarray(chunk[name]).tobytes())

    def _put_table(self, path: str, rows: list[dict[str, Any]], schema: pa.Schema) -> str:
        table = pa.Table.from_pylist(rows, schema=schema)
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="zstd")
        data = sink.getvalue()
        self.storage.put(path, data)
        return hashlib.sha256(data).hexdigest()
