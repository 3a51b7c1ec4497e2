"""A worker node is lost in the middle of a job: its shard goes to the actor that is left, the job ends normally.

This module runs its own two-node Ray cluster (``ray.cluster_utils.Cluster`` on 127.0.0.1: a head and a
worker node with one CPU each) and no other Ray instance; drivers run in subprocesses with ``--address``.
After the worker node is gone, the replacement actor the driver asks for can never be scheduled (the
surviving actor holds the only CPU left): the job must still finish on the surviving actor.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from cdam_worker.pipeline.faults import HOLD_ENV
from helpers import finish, output_files, save_tiny_vit, start_driver, wait_for, write_photo_shards
from jobs.verify import verify_output

MODEL_KWARGS = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3, num_classes=6)
N_SHARDS, SHARD_SIZE = 8, 8  # about 4 batches per shard: plenty of work is left after the first marker
# Ray rewrites a loopback --address (127.0.0.1:port) to the host's own IP, where this cluster's GCS does not
# listen; with this setting the driver keeps 127.0.0.1 (its node IP is then 127.0.0.1 too, like the nodes').
LOOPBACK_DRIVER_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@pytest.fixture(scope="module")
def cluster():
    """A head node with one CPU; each test adds (and loses) its worker node."""
    import ray
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized(), "another Ray instance is connected in this process"
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False}
    )
    try:
        yield cluster
    finally:
        cluster.shutdown()


def add_worker(cluster):
    node = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    return node


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("node-loss-data")
    spec = write_photo_shards(root, N_SHARDS, SHARD_SIZE, height=24, width=28, label=b"1", seed=2)
    return {"spec": spec, "checkpoint": save_tiny_vit(root / "model.pt", MODEL_KWARGS, [f"c{i}" for i in range(6)])}


def start_job(
    dataset: dict[str, str], output: Path, address: str, logs: Path, actors: int = 2, hold: Path | None = None
) -> subprocess.Popen:
    """The driver in a subprocess; with ``hold``, its actors wait before each batch while that file exists."""
    argv = [
        "explain",
        "--shards",
        dataset["spec"],
        "--output",
        str(output),
        "--checkpoint",
        dataset["checkpoint"],
        "--targets",
        "topk:2",
        "--batch-size",
        "2",
        "--actors",
        str(actors),
        "--address",
        address,
    ]
    env = dict(LOOPBACK_DRIVER_ENV)
    if hold is not None:
        hold.touch()
        env[HOLD_ENV] = str(hold)
    return start_driver(argv, logs, **env)


def actors_holding(hold: Path) -> int:
    """How many actors are waiting at the hold (each announces itself with a file next to it)."""
    return len(list(hold.parent.glob(f"{hold.name}.*")))


def shard_processors(cluster) -> list[dict]:
    """State and node of every ShardProcessor of the current driver, from the GCS (no driver needed here)."""
    actors = cluster.global_state.actor_table(None).values()
    return [
        {"state": a["State"], "node": a["Address"]["NodeID"]}
        for a in actors
        if a["ActorClassName"].endswith("ShardProcessor") and a["State"] != "DEAD"
    ]


@pytest.fixture(scope="module")
def reference(cluster, dataset, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The job on the head node alone (one actor), never disturbed."""
    root = tmp_path_factory.mktemp("node-loss-reference")
    status, _, stderr = finish(
        start_job(dataset, root / "out", cluster.address, root / "logs", actors=1), root / "logs"
    )
    assert status == 0, stderr
    assert verify_output(str(root / "out")) == []
    return output_files(root / "out")


def test_lost_worker_node_job_finishes_on_the_rest(cluster, dataset, reference, tmp_path):
    """The worker node goes while its actor explains a shard: the shard is retried on the head's actor, and the
    replacement actor the driver asks for can never be scheduled (no CPU left)."""
    worker = add_worker(cluster)
    output, hold = tmp_path / "out", tmp_path / "hold"
    driver = start_job(dataset, output, cluster.address, tmp_path / "logs", hold=hold)
    wait_for(lambda: actors_holding(hold) == 2, "both actors inside a shard", driver)
    assert {a["node"] for a in shard_processors(cluster) if a["state"] == "ALIVE"} == {
        cluster.head_node.node_id,
        worker.node_id,
    }
    cluster.remove_node(worker)
    hold.unlink()

    status, stdout, stderr = finish(driver, tmp_path / "logs")
    assert status == 0, stderr
    assert "actor died" in stderr and "retrying (attempt 2 of 3)" in stderr
    assert f"{N_SHARDS}/{N_SHARDS} shards complete" in stdout
    assert verify_output(str(output)) == []
    assert output_files(output) == reference


def test_worker_node_lost_while_its_actor_starts(cluster, dataset, reference, tmp_path):
    """The second actor waits for a CPU, gets one on a node that joins, and that node goes before the actor is
    ready (it is still loading the model): the job goes on with the head's actor instead of giving up."""
    output, hold = tmp_path / "out", tmp_path / "hold"
    driver = start_job(dataset, output, cluster.address, tmp_path / "logs", hold=hold)
    wait_for(
        lambda: len(shard_processors(cluster)) == 2 and actors_holding(hold) == 1,
        "the head's actor inside a shard and a second actor asked for",
        driver,
    )
    worker = add_worker(cluster)
    wait_for(
        lambda: any(a["node"] == worker.node_id and a["state"] != "ALIVE" for a in shard_processors(cluster)),
        "an actor starting on the new node",
        driver,
    )
    cluster.remove_node(worker)
    hold.unlink()

    status, stdout, stderr = finish(driver, tmp_path / "logs")
    assert status == 0, stderr
    assert "an actor could not start" in stderr
    assert f"{N_SHARDS}/{N_SHARDS} shards complete" in stdout
    assert verify_output(str(output)) == []
    assert output_files(output) == reference
