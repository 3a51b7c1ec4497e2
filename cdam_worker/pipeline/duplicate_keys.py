"""Keys seen in two shards, found from the written tables, without the driver holding every key.

Every sample group of a written shard has exactly one row, with its key, in its ``metadata/`` or ``errors/`` table.
Once every shard is written, map tasks (``SHARDS_PER_TASK`` shards each) read the key columns and split
(key, shard) pairs into buckets by a hash of the key; one reduce task per bucket reports each key of a shard
that an earlier shard (by position) also holds. The driver gets only those collisions.

A shard with such a key that it explained is explained again with those keys refused
(``ShardTask.duplicates``: "duplicate key 'k': already in shard s"), its marker deleted and its rows cleared
first, so its bytes are those of a plan that knew every key from the start; the run is marked complete after.
Refusing changes no shard's keys, so a second check finds the same collisions and nothing to redo: a run killed
at any point resumes to the same bytes.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cdam_worker.pipeline import ray_session
from cdam_worker.pipeline.cluster_scan import SHARDS_PER_TASK
from cdam_worker.pipeline.plan import Plan
from cdam_worker.pipeline.settings import ShardTask
from cdam_worker.run_files import open_zarr
from cdam_worker.storage import Storage
from schemas import array_specs
from schemas.paths import ERRORS_DIR, METADATA_DIR, marker_path, shard_table_path

MAX_BUCKETS = 64
KEYS = pa.schema([("key", pa.string()), ("shard", pa.int64())])


def shards_to_refuse_again(plan: Plan, address: str | None) -> list[ShardTask]:
    """The written shards that explained a key an earlier shard holds, made ready to be explained again with
    those keys refused (their markers deleted, their rows cleared); empty when there is nothing to redo."""
    duplicates = find_duplicates(plan, address)
    tasks = []
    for index, keys in sorted(duplicates.items()):
        task = plan.shards[index]
        if not explained_any(plan.storage, task, keys):
            continue  # already refused (or each of those samples failed on its own): nothing changes
        plan.storage.delete(marker_path(index))
        _clear_block(plan, task)
        tasks.append(dataclasses.replace(task, duplicates=keys))
    return tasks


def find_duplicates(plan: Plan, address: str | None) -> dict[int, dict[str, str]]:
    """Shard index -> {key: reason} for each key of a shard that an earlier shard (of another name) holds."""
    shards = [(t.shard_index, t.name) for t in plan.shards]
    groups = [shards[start : start + SHARDS_PER_TASK] for start in range(0, len(shards), SHARDS_PER_TASK)]
    if len(groups) <= 1:
        collisions = collisions_of(*map_keys(plan.storage.url, shards, 1))
    else:
        collisions = _on_ray(plan.storage.url, groups, address)
    names = {t.shard_index: t.name for t in plan.shards}
    found: dict[int, dict[str, str]] = {}
    for shard, key, first in collisions:
        if names[first] != names[shard]:
            found.setdefault(shard, {})[key] = f"duplicate key {key!r}: already in shard {names[first]}"
    return found


def _on_ray(url: str, groups: list[list[tuple[int, str]]], address: str | None) -> list[tuple[int, str, int]]:
    import ray

    from cdam_worker.pipeline.actor import FORWARDED_ENV

    ray_session.connect(address)
    n_buckets = min(MAX_BUCKETS, len(groups))
    env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    options = {"runtime_env": {"env_vars": env}} if env else {}
    mapper = ray.remote(num_cpus=1, num_returns=n_buckets, max_retries=3, **options)(map_keys)
    reducer = ray.remote(num_cpus=1, max_retries=3)(collisions_of)
    buckets = [mapper.remote(url, group, n_buckets) for group in groups]
    reduced = [reducer.remote(*[refs[b] for refs in buckets]) for b in range(n_buckets)]
    return sorted(c for part in ray.get(reduced) for c in part)


def map_keys(url: str, shards: Sequence[tuple[int, str]], n_buckets: int) -> list[pa.Table]:
    """The distinct (key, shard) pairs of ``shards``' tables, split into ``n_buckets`` tables by a hash of the key."""
    storage = Storage.from_url(url)
    tables = [
        pa.table({"key": keys, "shard": pa.array(np.full(len(keys), index), pa.int64())}, schema=KEYS)
        for index, name in shards
        if len(keys := _shard_keys(storage, index, name))
    ]
    pairs = pa.concat_tables(tables) if tables else KEYS.empty_table()
    bucket = pd.util.hash_pandas_object(pairs.column("key").to_pandas(), index=False).to_numpy() % n_buckets
    return [pairs.filter(pa.array(bucket == b)) for b in range(n_buckets)]


def collisions_of(*tables: pa.Table) -> list[tuple[int, str, int]]:
    """(shard, key, first shard) for each pair whose key a shard of a lower index also holds, sorted."""
    pairs = pa.concat_tables(tables).to_pandas()
    first = pairs.groupby("key")["shard"].transform("min")
    later = pairs[pairs["shard"] != first]
    return sorted(zip(later["shard"].tolist(), later["key"].tolist(), first.loc[later.index].tolist()))


def explained_any(storage: Storage, task: ShardTask, keys: dict[str, str]) -> bool:
    """Whether the shard's metadata table has a row of any of ``keys``."""
    explained = _key_column(storage, shard_table_path(METADATA_DIR, task.shard_index, task.name))
    return bool(np.isin(explained, list(keys)).any())


def _shard_keys(storage: Storage, index: int, name: str) -> pa.Array:
    """The distinct keys of a shard's metadata and errors rows (shard-level error rows have none)."""
    keys = [
        _key_column(storage, shard_table_path(folder, index, name), folder == ERRORS_DIR)
        for folder in (METADATA_DIR, ERRORS_DIR)
    ]
    column = pa.chunked_array(keys, pa.string()).drop_null()
    return column.unique() if len(column) else pa.array([], pa.string())


def _key_column(storage: Storage, path: str, optional: bool = False) -> pa.Array:
    try:
        data = storage.get(path)
    except FileNotFoundError:
        if optional:
            return pa.array([], pa.string())
        raise
    return pq.read_table(io.BytesIO(data), columns=["key"]).column("key").combine_chunks()


def _clear_block(plan: Plan, task: ShardTask) -> None:
    """Fill values over the shard's rows: its written chunks are deleted (Zarr drops chunks of fill values only)."""
    group = open_zarr(plan.storage)
    first = plan.layout.first_row(task.shard_index)
    for spec in array_specs(plan.layout.store_basis):
        group[spec.name][first : first + plan.layout.rows_per_shard] = plan.layout.fill_value(spec)
