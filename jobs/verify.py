"""``cdam verify DEST``: check that a finished output is complete and consistent.

Checks: the manifest is complete; every shard has a marker whose counts agree with the manifest;
each shard's Zarr block and Parquet files hash to the checksums recorded; every metadata row's
Zarr row is written (not fill values); keys are unique; Parquet row counts match the markers.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow.parquet as pq

from cdam_worker.job import MANIFEST_PATH, read_json
from cdam_worker.sinks import ShardSummary, block_checksums, marker_path, open_zarr, shard_file_stem
from cdam_worker.storage import Storage
from schemas import array_specs


def verify_output(url: str) -> list[str]:
    """Every problem found in the output at ``url`` (an empty list means it verified)."""
    storage = Storage.from_url(url)
    manifest = read_json(storage, MANIFEST_PATH)
    if manifest is None:
        return [f"{storage.url}: no {MANIFEST_PATH} (not a cdam output, or the run never started)"]
    problems = []
    if manifest.get("status") != "complete":
        problems.append(f"manifest status is {manifest.get('status')!r}, not 'complete' (rerun the job to finish it)")
    group = open_zarr(storage, mode="r")
    names = [spec.name for spec in array_specs(bool(manifest["layout"]["store_basis"]))]
    rows_per_shard = int(manifest["layout"]["rows_per_shard"])
    recorded = {s["index"]: s for s in manifest["shards"]}
    seen_keys: dict[str, str] = {}
    for entry in manifest["settings"]["shards"]:
        index = entry["index"]
        marker = read_json(storage, marker_path(index))
        if marker is None:
            problems.append(f"shard {index}: no completion marker")
            continue
        summary = ShardSummary(**marker)
        problems += [f"shard {summary.shard}: {p}" for p in _check_shard(storage, group, names, summary, rows_per_shard, entry, recorded.get(index), seen_keys)]
    return problems


def _check_shard(storage, group, names, summary: ShardSummary, rows_per_shard: int, planned: dict, recorded: dict | None, seen_keys: dict[str, str]) -> list[str]:
    problems = []
    if summary.n_samples != planned["n_samples"]:
        problems.append(f"marker counts {summary.n_samples} samples, manifest plans {planned['n_samples']}")
    if recorded is not None and recorded.get("checksums") != summary.checksums:
        problems.append("marker checksums differ from those the manifest recorded")
    first_row = summary.shard_index * rows_per_shard
    actual = block_checksums(group, first_row, summary.rows_checked, names)
    for name in names:
        if actual[name] != summary.checksums.get(name):
            problems.append(f"Zarr array {name!r} rows {first_row}..{first_row + summary.rows_checked - 1} do not match their checksum")
    stem = shard_file_stem(summary.shard_index, summary.shard)
    table = _read_table(storage, f"metadata/{stem}.parquet", summary.checksums.get("metadata"), problems)
    if table is not None:
        if table.num_rows != summary.n_images:
            problems.append(f"metadata has {table.num_rows} rows, marker says {summary.n_images} images")
        rows = np.asarray(table.column("row").to_pylist(), dtype=np.int64)
        outside = rows[(rows < first_row) | (rows >= first_row + rows_per_shard)]
        if outside.size:
            problems.append(f"metadata rows {outside[:5].tolist()} lie outside the shard's block")
        elif rows.size:
            written = ~np.isnan(group["embedding"].get_orthogonal_selection((rows, slice(0, 1)))[:, 0])
            for bad in rows[~written][:5].tolist():
                problems.append(f"metadata row {bad} points at unwritten Zarr data")
        for key in table.column("key").to_pylist():
            if key in seen_keys:
                problems.append(f"key {key!r} also in shard {seen_keys[key]}")
            seen_keys[key] = summary.shard
    errors_path = f"errors/{stem}.parquet"
    if summary.n_errors:
        errors = _read_table(storage, errors_path, summary.checksums.get("errors"), problems)
        if errors is not None and errors.num_rows != summary.n_errors:
            problems.append(f"errors has {errors.num_rows} rows, marker says {summary.n_errors}")
    return problems


def _read_table(storage: Storage, path: str, checksum: str | None, problems: list[str]):
    try:
        data = storage.get(path)
    except FileNotFoundError:
        problems.append(f"{path} is missing")
        return None
    if hashlib.sha256(data).hexdigest() != checksum:
        problems.append(f"{path} does not match its checksum")
    return pq.read_table(io.BytesIO(data))
