"""Counting the samples of shards that have no index: their tar headers are read by Ray tasks on the cluster,
several shards per task, and the driver keeps one count per shard (never a key).

A handful of shards (at most ``LOCAL_SCAN_SHARDS``) are counted in the driver's threads instead: starting
tasks would cost more than reading their headers.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from cdam_worker.pipeline import ray_session
from cdam_worker.pipeline.actor import FORWARDED_ENV  # the scan tasks get what the actors get, never credentials
from cdam_worker.shards.tar_reader import scan_shard

SHARDS_PER_TASK = 16
"""Shards a scan task reads (one after the other, ``SCAN_THREADS`` at a time): enough to amortise a task's start."""
SCAN_THREADS = 4
"""Shards a task (or the driver) reads at once: scans wait on storage more than on the CPU."""
LOCAL_SCAN_SHARDS = 8


def count_shards(urls: Sequence[str]) -> list[int]:
    """The number of key groups (samples) of each shard, header by header (a broken shard: those before the break)."""
    with ThreadPoolExecutor(max_workers=SCAN_THREADS) as pool:
        return [len(scan.keys) for scan in pool.map(scan_shard, urls)]


def count_samples(urls: Sequence[str], address: str | None) -> list[int]:
    """Samples of each shard of ``urls``: in the driver for a few shards, else by Ray tasks on the cluster at
    ``address`` (joined or started as the job's actors would be)."""
    if len(urls) <= LOCAL_SCAN_SHARDS:
        return count_shards(urls)
    import ray

    ray_session.connect(address)
    env_vars = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    task = ray.remote(num_cpus=1, max_retries=3, **({"runtime_env": {"env_vars": env_vars}} if env_vars else {}))(
        count_shards
    )
    batches = [list(urls[start : start + SHARDS_PER_TASK]) for start in range(0, len(urls), SHARDS_PER_TASK)]
    refs = {task.remote(batch): number for number, batch in enumerate(batches)}
    counts: list[list[int] | None] = [None] * len(batches)
    with tqdm(total=len(urls), desc="counting samples", unit="shard", file=sys.stderr) as bar:
        waiting = list(refs)
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1)
            number = refs[done[0]]
            counts[number] = ray.get(done[0])
            bar.update(len(batches[number]))
    return [count for batch in counts for count in batch]  # type: ignore[union-attr]
