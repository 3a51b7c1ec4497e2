"""The index part of planning: a wids shard list of N shards of 1,000 samples read into the run's shard tasks and
fingerprint (``python -m bench.bench_plan --shards 10000``). The model load, the first-sample check, the scan
without an index and the resume are not measured here yet."""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time

from cdam_worker.pipeline.plan import ExplainOptions, _shard_counts
from cdam_worker.pipeline.settings import ShardTask
from cdam_worker.shards.specs import shard_name
from cdam_worker.storage import Storage
from schemas.manifest import ModelSpec, fingerprint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shards", type=int, default=10000)
    args = parser.parse_args()
    folder = tempfile.mkdtemp()
    entries = [{"url": f"shard-{i:06d}.tar", "nsamples": 1000} for i in range(args.shards)]
    with open(f"{folder}/index.json", "w") as file:
        json.dump({"shardlist": entries}, file)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.time()
    options = ExplainOptions(
        shards=(), output=f"{folder}/out", model=ModelSpec("x"), shard_index=f"{folder}/index.json"
    )
    urls, counts, _ = _shard_counts(options, Storage.from_url(options.output))
    tasks = [ShardTask(i, url, shard_name(url), n) for i, (url, n) in enumerate(zip(urls, counts))]
    fingerprint({"shards": [{"index": t.shard_index, "url": t.url, "n_samples": t.n_samples} for t in tasks]})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    print(f"{args.shards} shards, {sum(counts)} samples: {time.time() - started:.2f} s, peak RSS +{peak:.0f} MiB")


if __name__ == "__main__":
    main()
