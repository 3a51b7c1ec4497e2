"""Where everything of a run lies below its output (a local folder or an S3 prefix ``DEST``)::

    cdam.zarr/                         Zarr v3 group (schemas/zarr_layout.py)
    metadata/NNNNNN-<shard>.parquet    one row per explained image (schemas/metadata.py)
    errors/NNNNNN-<shard>.parquet      one row per sample that could not be explained
    members/NNNNNN-<shard>.parquet     where each file of an uncompressed shard lies in it
    markers/NNNNNN.json                written last, once the shard's arrays and tables are durable
    manifest.json                      run settings, shard list, and (when complete) per-shard checksums
    lock.json                          the lease of the job writing the run
    locks/<task>.json                  the lease of a reading command writing into the run (derive, audit)
    derived/NAME/...                   maps derived from the basis (see :func:`derived_root`)

``NNNNNN`` is the shard's position in the run, six digits; ``<shard>`` its name (the file name without ``.tar``).
"""

from __future__ import annotations

from schemas.zarr_layout import DERIVED_GROUP

ZARR_PATH = "cdam.zarr"
MANIFEST_PATH = "manifest.json"
LOCK_PATH = "lock.json"
METADATA_DIR = "metadata"
ERRORS_DIR = "errors"
MEMBERS_DIR = "members"
MARKERS_DIR = "markers"
OUTPUT_PREFIXES = (ZARR_PATH, METADATA_DIR, ERRORS_DIR, MARKERS_DIR, MANIFEST_PATH)
"""What ``cdam explain --overwrite`` clears; any of them (but the manifest) present without a manifest marks an
unfinished or foreign run."""


def shard_file_stem(shard_index: int, shard_name: str) -> str:
    """``NNNNNN-<shard>``: the name of a shard's tables without their folder and suffix."""
    return f"{shard_index:06d}-{shard_name}"


def shard_table_path(folder: str, shard_index: int, shard_name: str) -> str:
    """The shard's table in ``folder`` (``METADATA_DIR``, ``ERRORS_DIR`` or ``MEMBERS_DIR``)."""
    return f"{folder}/{shard_file_stem(shard_index, shard_name)}.parquet"


def marker_path(shard_index: int) -> str:
    return f"{MARKERS_DIR}/{shard_index:06d}.json"


def task_lock_path(task: str) -> str:
    """The lock a reading command holds while it writes ``task``'s results into the run."""
    return f"locks/{task}.json"


def derived_root(name: str) -> str:
    """Where the tables, markers and manifest of derivation ``name`` live below the run."""
    return f"{DERIVED_GROUP}/{name}"


def derived_manifest_path(name: str) -> str:
    return f"{derived_root(name)}/{MANIFEST_PATH}"


def derived_marker_path(name: str, shard_index: int) -> str:
    return f"{derived_root(name)}/{MARKERS_DIR}/{shard_index:06d}.json"


def derived_table_path(name: str, shard_index: int, shard_name: str) -> str:
    """The per-shard statistics of derivation ``name`` (merged into ``derived/NAME/metadata.parquet`` at the end)."""
    return f"{derived_root(name)}/shards/{shard_file_stem(shard_index, shard_name)}.parquet"
