"""The scan without a shard index on a two-node ``ray.cluster_utils.Cluster`` (127.0.0.1, one CPU per node): the
Ray tasks count the samples the driver-side scan counts, a broken shard included."""

from __future__ import annotations

from cdam_worker.pipeline.cluster_scan import SHARDS_PER_TASK, count_samples, count_shards
from tests.helpers import make_shard, png_bytes
from tests.test_reading_cluster import cluster  # noqa: F401 - the module's fixture


def test_scan_tasks_on_two_nodes_count_what_the_driver_counts(cluster, tmp_path):  # noqa: F811
    image = png_bytes(4, 4)
    shards = [
        str(make_shard(tmp_path / f"s-{i:02d}.tar", [(f"k{i}-{j}", {"png": image, "cls": b"1"}) for j in range(i % 5)]))
        for i in range(2 * SHARDS_PER_TASK + 3)  # three tasks
    ]
    broken = tmp_path / "broken.tar"
    whole = make_shard(broken, [(f"b-{j}", {"png": image}) for j in range(6)]).read_bytes()
    broken.write_bytes(whole[: 3 * 1024 + 100])  # cut inside the fourth sample's member header
    urls = [*shards[:20], str(broken), *shards[20:]]

    on_cluster = count_samples(urls, cluster.address)
    assert on_cluster == count_shards(urls)
    assert on_cluster[:20] + on_cluster[21:] == [i % 5 for i in range(len(shards))]
    assert on_cluster[20] == 3
