"""Planning from a shard index: the formats read, a run planned from an index byte-identical to one planned by
scanning, and an index entry that undercounts a shard (its extra samples in errors/)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cdam_worker.shards.shard_index import index_beside, read_shard_index
from cdam_worker.shards.specs import DataError
from helpers import output_files, two_actor_explain_argv
from jobs.cli import main
from tests.test_job import dataset  # noqa: F401 - the module's fixture


def test_index_formats_resolve_urls_and_counts(tmp_path):
    (tmp_path / "a.tar").write_bytes(b"")
    wids = tmp_path / "wids.json"
    wids.write_text(json.dumps({"shardlist": [{"url": "a.tar", "nsamples": 3}, {"url": "/x/b.tar", "nsamples": 0}]}))
    assert [(e.url, e.n_samples) for e in read_shard_index(str(wids))] == [
        (str(tmp_path / "a.tar"), 3),
        ("/x/b.tar", 0),
    ]
    for n in ("00000", "00001"):
        (tmp_path / f"{n}_stats.json").write_text(json.dumps({"successes": 7, "failed_to_download": 2}))
    stats = read_shard_index(str(tmp_path / "*_stats.json"))
    assert [(e.url, e.n_samples) for e in stats] == [(str(tmp_path / "00000.tar"), 7), (str(tmp_path / "00001.tar"), 7)]
    pack = tmp_path / "index.json"
    pack.write_text(json.dumps({"format": "cdam.pack/1", "shards": [{"shard": "a.tar", "samples": 5, "bytes": 1}]}))
    assert [e.n_samples for e in index_beside([str(tmp_path / "a.tar")])] == [5]
    assert index_beside([str(tmp_path / "other.tar")]) is None
    wids.write_text(json.dumps({"shardlist": [{"url": "a.tar", "nsamples": -1}]}))
    with pytest.raises(DataError, match=r"shardlist\[0\]: the sample count must be an integer >= 0, got -1"):
        read_shard_index(str(wids))


def test_index_planned_run_is_byte_identical_to_a_scanned_one_and_wrong_counts_go_to_errors(
    ray_local,
    dataset,  # noqa: F811
    tmp_path,
):
    scanned, indexed = str(tmp_path / "scanned"), str(tmp_path / "indexed")
    assert main(two_actor_explain_argv(dataset, scanned, "--targets", "topk:1")) == 0
    manifest = json.loads(Path(scanned, "manifest.json").read_text())
    counts = [s["n_samples"] for s in manifest["settings"]["shards"]]
    index = tmp_path / "shards.json"
    index.write_text(json.dumps({"shardlist": [{"url": u, "nsamples": n} for u, n in zip(dataset["shards"], counts)]}))
    args = two_actor_explain_argv(dataset, indexed, "--targets", "topk:1", "--shard-index", str(index))
    args.remove("--shards"), args.remove(dataset["spec"])
    assert main(args) == 0
    assert output_files(indexed) == output_files(scanned)

    # index entries one short and one over: bad input like any other, recorded in errors/ (the run completes,
    # exit 0); the markers and the manifest hold the real counts, so verify finds every sample accounted for
    wrong = [counts[0] - 1, counts[1] + 1, *counts[2:]]
    index.write_text(json.dumps({"shardlist": [{"url": u, "nsamples": n} for u, n in zip(dataset["shards"], wrong)]}))
    off = str(tmp_path / "off")
    assert main(two_actor_explain_argv(dataset, off, "--targets", "topk:1", "--shard-index", str(index))) == 0
    reasons = {
        int(path.name[:6]): pq.read_table(path).column("reason").to_pylist()
        for path in Path(off, "errors").glob("*.parquet")
    }
    assert f"the tar holds {counts[0]} samples, but {counts[0] - 1} were planned" in " ".join(reasons[0])
    assert any(f"sample {counts[0] - 1} is beyond the {counts[0] - 1} samples planned" in r for r in reasons[0])
    assert f"the tar holds {counts[1]} samples, but {counts[1] + 1} were planned" in " ".join(reasons[1])
    shards = json.loads(Path(off, "manifest.json").read_text())["shards"]
    assert [s["n_samples"] for s in shards] == counts
    assert main(["verify", off]) == 0


def test_samples_of_many_shards_are_counted_by_ray_tasks(ray_local, tmp_path):
    from cdam_worker.pipeline.cluster_scan import LOCAL_SCAN_SHARDS, count_samples
    from tests.helpers import make_shard, png_bytes

    image = png_bytes(4, 4)
    shards = [
        str(make_shard(tmp_path / f"s-{i:02d}.tar", [(f"k{i}-{j}", {"png": image}) for j in range(i % 4)]))
        for i in range(LOCAL_SCAN_SHARDS + 9)
    ]
    (tmp_path / "broken.tar").write_bytes(b"")
    assert count_samples([*shards, str(tmp_path / "broken.tar")], None) == [i % 4 for i in range(len(shards))] + [0]
