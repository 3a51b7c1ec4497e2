"""Reading and writing a run's files on its storage: JSON documents, the Zarr group, and the checksums that
markers record and ``cdam verify`` checks. Shared by the job, the reading side and ``cdam verify``."""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from cdam_worker.storage import Storage
from schemas.paths import ZARR_PATH


def read_json(storage: Storage, path: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage.get(path))
    except FileNotFoundError:
        return None


def write_json(storage: Storage, path: str, payload: dict[str, Any]) -> None:
    storage.put(path, json.dumps(payload, indent=2, sort_keys=True).encode())


def open_zarr(storage: Storage, mode: str = "r+") -> zarr.Group:
    return zarr.open_group(store=storage.zarr_store(ZARR_PATH, read_only=mode == "r"), mode=mode, zarr_format=3)


def block_checksums(group: zarr.Group, first_row: int, n_rows: int, names: list[str]) -> dict[str, str]:
    """sha256 of each array's values over rows [first_row, first_row + n_rows) (C order)."""
    return {
        name: hashlib.sha256(np.ascontiguousarray(group[name][first_row : first_row + n_rows]).tobytes()).hexdigest()
        for name in names
    }


def read_checked_table(
    storage: Storage, path: str, checksum: str | None, problems: list[str], prefix: str = ""
) -> pa.Table | None:
    """A Parquet file written with its sha256 recorded, read back for a check: what is wrong with it (missing,
    not matching ``checksum``, unreadable) is appended to ``problems`` (each line starting with ``prefix``)."""
    try:
        data = storage.get(path)
    except FileNotFoundError:
        problems.append(f"{prefix}{path} is missing")
        return None
    if hashlib.sha256(data).hexdigest() != checksum:
        problems.append(f"{prefix}{path} does not match its checksum")
    try:
        return pq.read_table(io.BytesIO(data))
    except Exception as error:  # noqa: BLE001 - a damaged file is a problem to list, not a crash
        problems.append(f"{prefix}{path} cannot be read as Parquet ({type(error).__name__})")
        return None
