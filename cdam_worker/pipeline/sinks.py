"""Arrays and tables out: a shard's block of the Zarr store, its Parquet tables and its completion marker
(the paths are in schemas/paths.py, the marker's fields in schemas/manifest.py)."""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.codecs import ZstdCodec

from cdam_worker.storage import Storage
from schemas import CHUNK_ROWS, ERRORS_SCHEMA, HEAD_GROUP, MEMBERS_SCHEMA, METADATA_SCHEMA, Layout, array_specs
from schemas.manifest import ShardSummary, count_mismatch_reason
from schemas.paths import ERRORS_DIR, MEMBERS_DIR, METADATA_DIR, ZARR_PATH, marker_path, shard_table_path


def create_zarr(
    storage: Storage, layout: Layout, attributes: dict[str, Any], head: tuple[np.ndarray, np.ndarray] | None = None
) -> None:
    """Create the group and its (empty) arrays; only the driver writes Zarr metadata.

    ``head`` (weight (C, D), bias (C)) is the model's linear head, stored with the basis as ``head/``: the class
    directions that turn the basis into the map of any class later, without the model.
    """
    group = zarr.open_group(store=storage.zarr_store(ZARR_PATH), mode="w", zarr_format=3, attributes=attributes)
    if head is not None:
        head_group = group.create_group(HEAD_GROUP)
        for name, values, dims in (("weight", head[0], ("class", "feature")), ("bias", head[1], ("class",))):
            values = np.ascontiguousarray(values, dtype=np.float32)
            head_group.create_array(
                name, data=values, chunks=values.shape, dimension_names=dims, compressors=ZstdCodec(level=3)
            )
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


class ShardWriter:
    """Writes one shard's block: Zarr chunks as they fill, the Parquet tables and the marker at the end.

    Rows arrive in shard order; a chunk is written once no later row can fall into it, so the writer
    holds at most one chunk of rows per array. One bad sample costs one sample: a row that cannot be
    stored (a value its metadata column cannot hold, arrays of the wrong shape, a row out of order)
    becomes that sample's error row, and its Zarr row keeps its fill values.
    """

    def __init__(
        self,
        storage: Storage,
        group: zarr.Group,
        layout: Layout,
        shard_index: int,
        shard: str,
        url: str,
        n_samples: int,
        run_id: str,
    ) -> None:
        if n_samples > layout.rows_per_shard:
            raise ValueError(
                f"shard {shard} has {n_samples} samples but the run reserves {layout.rows_per_shard} rows per shard"
            )
        self.storage, self.layout = storage, layout
        self.shard_index, self.shard, self.url, self.n_samples, self.run_id = shard_index, shard, url, n_samples, run_id
        self.first_row = layout.first_row(shard_index)
        self.names = [spec.name for spec in array_specs(layout.store_basis)]
        self.arrays = {name: group[name] for name in self.names}  # opened once: each open reads zarr.json
        self.hashes = {name: hashlib.sha256() for name in self.names}
        self.pending: list[dict[str, Any]] = []  # metadata rows of the chunk being filled
        self.metadata: list[pa.RecordBatch] = []  # metadata rows of the chunks already written
        self.errors: list[dict[str, Any]] = []
        self.members: list[tuple[str, str, int, int]] = []  # (key, member, offset, size) of the shard's files
        self.n_shard_errors = 0
        self.last_row = -1  # local row of the last image recorded
        self.chunk_index = 0  # chunk of the block being filled
        self.buffer = self._empty_chunk()
        self.rows_flushed = 0

    def add(self, row: ExplainedRow) -> None:
        """Record an explained image at its row of the shard's block (or, if it cannot be stored, as an error)."""
        if not self.last_row < row.local_row < self.n_samples:
            self.add_error(
                row.key,
                f"cannot store sample {row.local_row}: rows must arrive in order (the last was {self.last_row}) and below {self.n_samples}",
            )
            return
        self._advance_to(row.local_row)
        offset = row.local_row - self.chunk_index * CHUNK_ROWS
        for name in self.names:
            value, expected = row.arrays.get(name), self.buffer[name].shape[1:]
            if np.shape(value) != expected:
                self._clear(offset)
                self.add_error(
                    row.key,
                    f"cannot store sample {row.local_row}: Zarr array {name!r} needs shape {expected}, got {np.shape(value)}",
                )
                return
            self.buffer[name][offset] = value
        self.last_row = row.local_row
        self.pending.append(
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
        """Record a sample that could not be explained, or with key None a problem of the shard itself.

        Text is stored as UTF-8 (undecodable characters escaped), the reason on one line.
        """
        self.n_shard_errors += int(key is None)
        self.errors.append(
            {
                "shard": _utf8(self.shard),
                "shard_index": self.shard_index,
                "key": None if key is None else _utf8(key),
                "reason": _storable_line(reason),
                "run_id": self.run_id,
            }
        )

    def add_members(self, members: list[tuple[str, str, int, int]]) -> None:
        """Record where the shard's files lie in it: (key, member name, data offset, size) each."""
        self.members.extend(members)

    def record_samples_read(self, count: int) -> None:
        """How many samples the tar held (each explained or in errors/). Where the plan counted another number (a
        wrong shard index entry, or a shard that changed), a shard-level row of errors/ says so and the marker
        records the real count, so the shard is complete and every sample accounted for."""
        if count != self.n_samples:
            self.add_error(None, count_mismatch_reason(count, self.n_samples))
            self.n_samples = count

    def finish(self) -> ShardSummary:
        """Write the last chunk, the tables, then the completion marker."""
        if self.pending:
            self._close_chunk()
        metadata_path, errors_path, members_path = (
            shard_table_path(folder, self.shard_index, self.shard) for folder in (METADATA_DIR, ERRORS_DIR, MEMBERS_DIR)
        )
        checksums = {name: digest.hexdigest() for name, digest in self.hashes.items()}
        metadata = pa.Table.from_batches(self.metadata, schema=METADATA_SCHEMA).combine_chunks()
        checksums["metadata"] = self._put_table(metadata_path, metadata)
        if self.errors:
            checksums["errors"] = self._put_table(errors_path, pa.Table.from_pylist(self.errors, schema=ERRORS_SCHEMA))
        else:
            self.storage.delete(errors_path)  # a stale file from an earlier attempt
        if self.members:
            key, member, offset, size = zip(*self.members)
            columns = [
                pa.array([_utf8(text) for text in key]),
                pa.array([_utf8(text) for text in member]),
                pa.array(offset, pa.int64()),
                pa.array(size, pa.int64()),
            ]
            checksums["members"] = self._put_table(members_path, pa.Table.from_arrays(columns, schema=MEMBERS_SCHEMA))
        else:
            self.storage.delete(members_path)
        summary = ShardSummary(
            self.shard,
            self.shard_index,
            self.url,
            self.n_samples,
            metadata.num_rows,
            len(self.errors),
            self.n_shard_errors,
            self.rows_flushed,
            checksums,
        )
        self.storage.put(marker_path(self.shard_index), summary.to_json())
        return summary

    def _empty_chunk(self) -> dict[str, np.ndarray]:
        chunk = {}
        for spec in array_specs(self.layout.store_basis):
            chunk[spec.name] = np.full(
                self.layout.chunks(spec), self.layout.fill_value(spec), dtype=self.layout.dtype(spec)
            )
        return chunk

    def _clear(self, offset: int) -> None:
        """Put fill values back into one row of the chunk being filled."""
        for spec in array_specs(self.layout.store_basis):
            self.buffer[spec.name][offset] = self.layout.fill_value(spec)

    def _advance_to(self, local_row: int) -> None:
        while self.chunk_index < local_row // CHUNK_ROWS:
            self._close_chunk()  # a chunk with no explained row stays unwritten, but its fill values count in the checksum
            self.chunk_index += 1
            self.buffer = self._empty_chunk()

    def _close_chunk(self) -> None:
        """Convert the chunk's metadata, write its arrays if any of its rows is explained, and hash it."""
        if self._convert_pending():
            start = self.first_row + self.chunk_index * CHUNK_ROWS
            for name, array in self.arrays.items():
                array[start : start + CHUNK_ROWS] = self.buffer[name]
        self._hash_chunk(self.buffer)
        self.rows_flushed += CHUNK_ROWS

    def _convert_pending(self) -> bool:
        """Move the chunk's metadata rows into Arrow; a row that does not fit the schema becomes that sample's
        error and its arrays fill values. Returns whether any row of the chunk is explained."""
        rows, self.pending = self.pending, []
        try:
            batch = _metadata_batch(rows)
        except _UNSTORABLE:  # find the rows at fault, one at a time (only for a chunk that has one)
            good = []
            for row in rows:
                try:
                    _metadata_batch([row])
                    good.append(row)
                except _UNSTORABLE:
                    self._clear(row["row"] - self.first_row - self.chunk_index * CHUNK_ROWS)
                    self.add_error(row["key"], _unstorable_reason(row))
            batch = _metadata_batch(good)
        self.metadata.append(batch)
        return batch.num_rows > 0

    def _hash_chunk(self, chunk: dict[str, np.ndarray]) -> None:
        for name in self.names:
            self.hashes[name].update(np.ascontiguousarray(chunk[name]).tobytes())

    def _put_table(self, path: str, table: pa.Table) -> str:
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="zstd")
        data = sink.getvalue()
        self.storage.put(path, data)
        return hashlib.sha256(data).hexdigest()


# What converting a Python value to an Arrow column raises when the column cannot hold it.
_UNSTORABLE = (pa.ArrowException, ValueError, TypeError, OverflowError)
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def _metadata_batch(rows: list[dict[str, Any]]) -> pa.RecordBatch:
    """Metadata rows as Arrow; raises ValueError for a null in a non-nullable column (Parquet would refuse it)."""
    batch = pa.RecordBatch.from_pylist(rows, schema=METADATA_SCHEMA)
    for column_field, column in zip(METADATA_SCHEMA, batch.columns):
        if not column_field.nullable and column.null_count:
            raise ValueError(f"column {column_field.name!r} is declared non-nullable but contains nulls")
    return batch


def _unstorable_reason(row: dict[str, Any]) -> str:
    """Which column of a metadata row cannot hold its value, and why (one line)."""
    for column_field in METADATA_SCHEMA:
        value = row.get(column_field.name)
        try:
            if value is None and not column_field.nullable:
                raise ValueError("null in a non-nullable column")
            pa.array([value], type=column_field.type)
        except _UNSTORABLE as error:
            return f"metadata column {column_field.name!r} cannot hold {_short_repr(value)}: {type(error).__name__}: {error}"
    return "the metadata row does not fit its schema"


def _short_repr(value: Any, limit: int = 80) -> str:
    """repr of a value for an error reason, long strings cut short."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} characters)"
    return repr(value)[: 2 * limit]


def _utf8(text: str) -> str:
    """``text`` as storable UTF-8: lone surrogates (undecodable bytes of a tar member name) escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _storable_line(text: str) -> str:
    """``text`` as one line of storable UTF-8: control characters and lone surrogates escaped."""
    return _UNPRINTABLE.sub(lambda match: repr(match.group())[1:-1], text)
