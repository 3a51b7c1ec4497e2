"""The reading commands on a two-node Ray cluster (``ray.cluster_utils.Cluster`` on 127.0.0.1, one CPU per node):
``cdam derive`` (a task per shard), ``cdam evaluate`` (a task per shard's images of the sample) and ``cdam audit``
(a task per block of rows read and per class) write the same bytes as the same commands run in this process.

The drivers run in this process, connected to the cluster; the local runs have no RAY_ADDRESS.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cdam_worker.reading import open_run
from cdam_worker.reading.cluster import run_units
from jobs.cli import main
from schemas.paths import LOCK_PATH


@pytest.fixture(scope="module")
def cluster():
    """A head node and one more node, one CPU each, and this process connected to them."""
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized(), "another Ray instance is connected in this process"
    # What RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 sets when Ray is imported (test_node_loss.py's drivers): this driver
    # keeps the cluster's loopback address instead of rewriting it to the host's IP, where no GCS listens.
    loopback = pytest.MonkeyPatch()
    loopback.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False},
    )
    cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        loopback.undo()


def copies(demo_run: str, folder: Path) -> tuple[str, str]:
    """Two copies of the demo run: one for the command here, one for the command on the cluster."""
    here, there = folder / "here", folder / "cluster"
    shutil.copytree(demo_run, here)
    shutil.copytree(demo_run, there)
    return str(here), str(there)


def files(folder: str) -> dict[str, bytes]:
    """Every file of the run but its locks (they record who held them), the run's own path in them (the audit's
    summary names the run) written DEST."""
    root = Path(folder)
    return {
        str(p.relative_to(root)): p.read_bytes().replace(folder.encode(), b"DEST")
        for p in root.rglob("*")
        if p.is_file() and p.name != LOCK_PATH and "locks" not in p.relative_to(root).parts
    }


def run_both(argv: list[str], here: str, there: str, cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """``cdam ARGV`` on the copy here (no cluster named), then with ``--address`` on the other copy."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main([argv[0], here, *argv[1:]]) == 0
    assert main([argv[0], there, *argv[1:], "--address", cluster.address]) == 0


def test_units_run_as_tasks_on_both_nodes_each_opening_the_run(cluster, demo_run):
    def _node_of(unit: int, run, _shared: None) -> tuple[int, str, int]:  # nested: Ray sends it by value
        import ray

        return unit, ray.get_runtime_context().get_node_id(), len(run.shards)

    results = run_units(_node_of, list(range(8)), open_run(demo_run), address=cluster.address)
    assert [unit for unit, _, _ in results] == list(range(8))  # in the units' order
    assert {node for _, node, _ in results} == {node.node_id for node in cluster.list_all_nodes()}
    assert {shards for _, _, shards in results} == {4}


def test_derive_on_the_cluster_writes_the_same_bytes(cluster, demo_run, tmp_path, monkeypatch):
    here, there = copies(demo_run, tmp_path)
    run_both(["derive", "--targets", "classes:1,2", "--name", "two"], here, there, cluster, monkeypatch)
    written = files(here)
    assert any(name.startswith("derived/two/markers/") for name in written)
    assert written == files(there)


def test_evaluate_on_the_cluster_writes_the_same_bytes(cluster, demo_run, tmp_path, monkeypatch):
    here, there = copies(demo_run, tmp_path)
    argv = ["evaluate", "--sample", "24", "--batch-size", "4", "--methods", "cdam", "--steps", "2"]
    run_both([*argv, "--sanity", "0", "--robustness", "0", "--device", "cpu"], here, there, cluster, monkeypatch)
    written = files(here)
    assert "evaluation/images.parquet" in written
    assert written == files(there)


def test_audit_on_the_cluster_writes_the_same_bytes(cluster, demo_run, tmp_path, monkeypatch):
    here, there = copies(demo_run, tmp_path)
    shutil.rmtree(Path(here, "audit"))  # the demo's own audit: these write theirs
    shutil.rmtree(Path(there, "audit"))
    run_both(["audit", "--no-model", "--min-images", "8"], here, there, cluster, monkeypatch)
    written = files(here)
    assert "audit/images.parquet" in written
    assert written == files(there)
