"""Jobs on a Ray cluster whose nodes hold fake GPUs (``num_gpus=1`` without CUDA), all on 127.0.0.1.

This module runs its own ``ray.cluster_utils.Cluster`` (no other Ray instance) and its drivers in
subprocesses with ``--address``. First the head node alone (2 CPUs, 1 fake GPU): the job starts one actor
per GPU, which finds no usable CUDA, says so once and computes on the CPU, decoding with both of the
node's CPUs. Then a second node joins (1 CPU, 1 fake GPU): two actors, one per node, each taking shards,
decode pools sized per node (2 and 1 workers), and an output byte-identical to the single-node run.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cdam_worker.pipeline.faults import HOLD_ENV
from helpers import finish, output_files, save_tiny_vit, start_driver, wait_for, write_photo_shards
from jobs.verify import verify_output

MODEL_KWARGS = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3, num_classes=6)
N_SHARDS, SHARD_SIZE = 4, 9
# As in test_node_loss.py: keep the driver on 127.0.0.1, where this cluster listens.
LOOPBACK_DRIVER_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
NO_CUDA_WARNING = "warning: actors hold a GPU of the Ray cluster but CUDA is not usable on their node (torch.cuda.is_available() is False); they compute on the CPU"
ACTOR_LINE = re.compile(
    r"^actor \d+: node (\w+), cpu, decode cpu with (\d+) worker\(s\), batch 4, (\d+) shard\(s\), peak RSS \d+ MiB$",
    re.MULTILINE,
)


@pytest.fixture(scope="module")
def cluster():
    """The head node: 2 CPUs and one fake GPU."""
    import ray
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized(), "another Ray instance is connected in this process"
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "num_gpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False},
    )
    try:
        yield cluster
    finally:
        cluster.shutdown()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Four shards of small photos with a corrupt JPEG in each (error rows must match too)."""
    root = tmp_path_factory.mktemp("multinode-data")
    spec = write_photo_shards(root, N_SHARDS, SHARD_SIZE, height=40, width=36, label=b"2", seed=5, corrupt=True)
    return {"spec": spec, "checkpoint": save_tiny_vit(root / "model.pt", MODEL_KWARGS, [f"c{i}" for i in range(6)])}


def run_job(dataset: dict[str, str], cluster, root: Path, hold: Path | None = None) -> tuple[str, str]:
    """The job with default actors and decode workers; returns (stdout, stderr) after checking it succeeded."""
    argv = [
        "explain",
        "--shards",
        dataset["spec"],
        "--output",
        str(root / "out"),
        "--checkpoint",
        dataset["checkpoint"],
        "--targets",
        "topk:2",
        "--batch-size",
        "4",
        "--address",
        cluster.address,
    ]
    env = dict(LOOPBACK_DRIVER_ENV)
    if hold is not None:
        hold.touch()
        env[HOLD_ENV] = str(hold)
    driver = start_driver(argv, root / "logs", **env)
    if hold is not None:  # both actors inside a shard: each takes part, whichever starts first
        wait_for(lambda: len(list(hold.parent.glob(f"{hold.name}.*"))) == 2, "both actors inside a shard", driver)
        hold.unlink()
    status, stdout, stderr = finish(driver, root / "logs")
    assert status == 0, stderr
    assert f"{N_SHARDS}/{N_SHARDS} shards complete" in stdout and f"{N_SHARDS} samples in errors/" in stdout
    assert verify_output(str(root / "out")) == []
    return stdout, stderr


@pytest.fixture(scope="module")
def single_node(cluster, dataset, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("single-node")
    _, stderr = run_job(dataset, cluster, root)
    return {"stderr": stderr, "files": output_files(root / "out")}


def test_fake_gpu_job_runs_one_actor_per_gpu_on_the_cpu_decoding_with_the_node_cpus(single_node):
    stderr = single_node["stderr"]
    assert stderr.count(NO_CUDA_WARNING) == 1, stderr
    assert "Found no NVIDIA driver" not in stderr
    assert "actors: 1 at the end" in stderr
    assert [(workers, shards) for _, workers, shards in ACTOR_LINE.findall(stderr)] == [("2", str(N_SHARDS))], stderr


def test_two_nodes_share_the_shards_and_write_the_same_bytes(cluster, dataset, single_node, tmp_path):
    worker = cluster.add_node(num_cpus=1, num_gpus=1, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    try:
        _, stderr = run_job(dataset, cluster, tmp_path, hold=tmp_path / "hold")
    finally:
        cluster.remove_node(worker)
    actors = {
        node: (int(workers), int(shards)) for node, workers, shards in ACTOR_LINE.findall(stderr)
    }  # node -> (decode workers, shards)
    head, second = cluster.head_node.node_id[:12], worker.node_id[:12]
    assert sorted(actors) == sorted([head, second]), stderr
    assert (actors[head][0], actors[second][0]) == (2, 1)  # each node's CPUs
    assert min(actors[head][1], actors[second][1]) >= 1 and actors[head][1] + actors[second][1] == N_SHARDS
    assert stderr.count(NO_CUDA_WARNING) == 1, stderr
    assert output_files(tmp_path / "out") == single_node["files"]
