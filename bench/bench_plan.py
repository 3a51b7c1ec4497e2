"""The driver's planning of ``cdam explain`` (``make_plan``, what ``--dry-run`` runs before it prints): plan time and
peak RSS against the number of shards, each case in its own process.

Cases: ``index`` (a wids shard list), ``scan`` (no index: Ray tasks on a local Ray read the tar headers; the
local Ray's start is timed apart), ``resume`` (the manifest of a finished run of the same shards is there),
``cluster`` (the scan on a ``ray.cluster_utils.Cluster`` of 1 and of 2 one-CPU nodes, warm workers) and ``s3``
(index and scan against a moto S3 server behind a request-counting proxy). The model is a 1-block ViT
checkpoint; a shard is one tar of ``--samples`` tiny PNG samples (about 1 KiB of tar each), hard-linked N times
(the scan then reads from the page cache: storage latency is what the S3 case shows).

``python -m bench.bench_plan`` (defaults sized for the shared 2-core machine); ``--case`` runs one case.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

SAMPLE_PNG_SIDE = 4
S3_LARGE_MEMBER = 110_000
"""Bytes of an image member in the second S3 case: about an ImageNet JPEG (6.4 GB / 50,000 val images = 128 KB)."""


def _status_mib(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS: now; VmHWM: the peak so far), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def write_model(root: Path) -> str:
    """A 1-block ViT checkpoint (6 classes, 32 px): the model load costs next to nothing."""
    import timm

    from cdam_worker import save_checkpoint

    kwargs = dict(img_size=32, patch_size=8, depth=1, embed_dim=48, num_heads=3, num_classes=6)
    path = root / "model.pt"
    model = timm.create_model("vit_small_patch16_224", **kwargs)
    save_checkpoint(path, model, "vit_small_patch16_224", kwargs, [f"c{i}" for i in range(6)])
    return str(path)


def write_shard(path: Path, samples: int, member_bytes: int = 0) -> None:
    """One tar of ``samples`` samples, a tiny PNG each (padded after its end to ``member_bytes``: PNG decoders stop
    at its last chunk), written with the tarfile module."""
    from tests.helpers import png_bytes

    image = png_bytes(SAMPLE_PNG_SIDE, SAMPLE_PNG_SIDE)
    image += bytes(max(0, member_bytes - len(image)))
    with tarfile.open(path, "w") as tar:
        for number in range(samples):
            info = tarfile.TarInfo(f"k{number:06d}.png")
            info.size = len(image)
            tar.addfile(info, io.BytesIO(image))


def shard_folder(root: Path, n: int, samples: int) -> list[str]:
    """``n`` shards (hard links of one tar) in a folder of their own."""
    folder = root / f"shards-{n}"
    folder.mkdir()
    base = root / "base.tar"
    if not base.exists():
        write_shard(base, samples)
    urls = [str(folder / f"shard-{i:06d}.tar") for i in range(n)]
    for url in urls:
        os.link(base, url)
    return urls


def write_wids(path: Path, urls: list[str], samples: int) -> str:
    path.write_text(json.dumps({"shardlist": [{"url": u, "nsamples": samples} for u in urls]}))
    return str(path)


def options(model: str, output: str, urls: list[str] = (), index: str | None = None):
    from cdam_worker.pipeline.plan import ExplainOptions
    from schemas.manifest import ModelSpec

    return ExplainOptions(
        shards=tuple(urls), output=output, model=ModelSpec(None, checkpoint=model), targets="topk:1", shard_index=index
    )


def timed_plan(opts) -> dict:
    """make_plan's wall time and its peak RSS above the process's RSS before it (imports done; a peak of the
    imports above that is reset first, so it cannot hide the plan's)."""
    from cdam_worker.pipeline.plan import make_plan

    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the RSS now
    base = _status_mib("VmRSS")
    started = time.perf_counter()
    plan = make_plan(opts)
    seconds = time.perf_counter() - started
    return {
        "seconds": round(seconds, 3),
        "rss_above_mib": round(_status_mib("VmHWM") - base, 1),
        "interpreter_mib": round(base, 1),
        "shards": len(plan.shards),
        "samples": sum(t.n_samples for t in plan.shards),
        "counts_from": plan.counts_from,
        "plan": plan,
    }


def case_index(root: Path, n: int, samples: int) -> dict:
    urls = shard_folder(root, n, samples)
    index = write_wids(root / "wids.json", urls, samples)
    return timed_plan(options(write_model(root), str(root / "out"), index=index))


def case_scan(root: Path, n: int, samples: int) -> dict:
    from cdam_worker.pipeline import ray_session

    urls = shard_folder(root, n, samples)
    model = write_model(root)
    started = time.perf_counter()
    ray_session.connect(None)  # the local Ray make_plan would start: timed apart
    ray_start = time.perf_counter() - started
    result = timed_plan(options(model, str(root / "out"), urls))
    return {**result, "ray_start_s": round(ray_start, 2)}


def case_resume(root: Path, n: int, samples: int) -> dict:
    """A finished run faked cheaply: the manifest the job writes at the end (status complete), from a first plan."""
    from cdam_worker.pipeline.run_output import _manifest
    from cdam_worker.run_files import write_json
    from schemas.paths import MANIFEST_PATH

    urls = shard_folder(root, n, samples)
    model = write_model(root)
    first = timed_plan(options(model, str(root / "out"), urls, index=write_wids(root / "wids.json", urls, samples)))
    write_json(first["plan"].storage, MANIFEST_PATH, _manifest(first["plan"], status="complete"))
    (root / "shards.json").write_text(json.dumps(urls))
    command = [sys.executable, "-m", "bench.bench_plan", "--case", "resumed", "--root", str(root)]
    return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()[-1])


def case_resumed(root: Path) -> dict:
    """The resume's plan, in a process of its own (its peak RSS not the first plan's)."""
    urls = json.loads((root / "shards.json").read_text())
    return timed_plan(options(str(root / "model.pt"), str(root / "out"), urls))


def case_cluster(root: Path, n: int, samples: int, nodes: int) -> dict:
    """The scan tasks on a Cluster of ``nodes`` one-CPU nodes: a first scan (workers start), then a timed one."""
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    from cdam_worker.pipeline.cluster_scan import count_samples

    urls = shard_folder(root, n, samples)
    ray_constants.ENABLE_RAY_CLUSTER = False  # keep the loopback address (as tests/test_reading_cluster.py does)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False},
    )
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        started = time.perf_counter()
        count_samples(urls, cluster.address)
        cold = time.perf_counter() - started
        started = time.perf_counter()
        counts = count_samples(urls, cluster.address)
        warm = time.perf_counter() - started
    finally:
        ray.shutdown()
        cluster.shutdown()
    return {
        "nodes": nodes,
        "shards": n,
        "samples": sum(counts),
        "cold_s": round(cold, 2),
        "seconds": round(warm, 2),
        "shards_per_s": round(n / warm, 1),
    }


def case_s3(root: Path, n: int, samples: int, member_bytes: int) -> dict:
    """Index and scan plans of ``n`` shards on moto S3, every request counted by the proxy of tests/helpers.py."""
    import boto3
    from moto.server import ThreadedMotoServer

    from cdam_worker.pipeline import ray_session
    from tests.helpers import S3Proxy

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench-key",
        AWS_SECRET_ACCESS_KEY="bench-secret",
        AWS_REGION="us-east-1",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    model = write_model(root)
    write_shard(root / "base.tar", samples, member_bytes)
    with S3Proxy(f"http://{host}:{port}") as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.url  # set before Ray starts: its workers inherit it
        client = boto3.client("s3", endpoint_url=proxy.url)
        client.create_bucket(Bucket="bench")
        urls = [f"s3://bench/shards/shard-{i:06d}.tar" for i in range(n)]
        for url in urls:
            client.upload_file(str(root / "base.tar"), "bench", url[len("s3://bench/") :])
        index = {"shardlist": [{"url": u, "nsamples": samples} for u in urls]}
        client.put_object(Bucket="bench", Key="wids.json", Body=json.dumps(index).encode())
        ray_session.connect(None)
        results = {}
        for name, opts in (
            ("index", options(model, "s3://bench/out-index", index="s3://bench/wids.json")),
            ("scan", options(model, "s3://bench/out-scan", urls)),
        ):
            before, served = len(proxy.forwarded), proxy.bytes_served
            result = timed_plan(opts)
            methods = [method for method, _ in proxy.forwarded[before:]]
            results[name] = {
                "seconds": result["seconds"],
                "requests": len(methods),
                "by_method": {m: methods.count(m) for m in sorted(set(methods))},
                "bytes_served": proxy.bytes_served - served,
                "samples": result["samples"],
            }
    server.stop()
    return {"shards": n, "samples_per_shard": samples, "member_bytes": member_bytes, **results}


CASES = {"index": case_index, "scan": case_scan, "resume": case_resume}


def run_case(case: str, n: int, samples: int, *extra: str) -> dict:
    """One case in a fresh process (its peak RSS its own); its JSON line."""
    command = [sys.executable, "-m", "bench.bench_plan", "--case", case, "--n", str(n), "--samples", str(samples)]
    done = subprocess.run([*command, *extra], capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"bench case {case} n={n} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def child(case: str, n: int, samples: int, nodes: int, member_bytes: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        if case == "cluster":
            result = case_cluster(root, n, samples, nodes)
        elif case == "s3":
            result = case_s3(root, n, samples, member_bytes)
        else:
            result = CASES[case](root, n, samples)
    result.pop("plan", None)
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=[*CASES, "cluster", "s3", "resumed"], help="run one case in this process")
    parser.add_argument("--root", type=Path, help="folder of --case resumed (written by --case resume)")
    parser.add_argument("--n", type=int, default=50, help="shards of --case")
    parser.add_argument("--nodes", type=int, default=1, help="nodes of --case cluster")
    parser.add_argument("--samples", type=int, default=1000, help="samples per shard")
    parser.add_argument("--member-bytes", type=int, default=0, help="bytes of each image member of --case s3")
    parser.add_argument("--index", default="50,500,5000,10000", help="shard counts planned from an index")
    parser.add_argument("--scan", default="50,500", help="shard counts planned by the scan")
    parser.add_argument("--resume", default="50,500,5000", help="shard counts of the resumed finished run")
    parser.add_argument("--cluster-shards", type=int, default=200, help="shards scanned on 1 and 2 nodes")
    parser.add_argument("--s3-shards", type=int, default=10, help="shards on the moto S3 server")
    args = parser.parse_args()
    if args.case == "resumed":
        return print(json.dumps({k: v for k, v in case_resumed(args.root).items() if k != "plan"}))
    if args.case:
        return child(args.case, args.n, args.samples, args.nodes, args.member_bytes)
    print(f"load average before: {os.getloadavg()}", flush=True)
    for case, counts in (("index", args.index), ("resume", args.resume), ("scan", args.scan)):
        for n in [int(c) for c in counts.split(",") if c]:
            print(json.dumps({"case": case, **run_case(case, n, args.samples)}), flush=True)
    for nodes in ("1", "2"):
        result = run_case("cluster", args.cluster_shards, args.samples, "--nodes", nodes)
        print(json.dumps({"case": "cluster", **result}), flush=True)
    for samples, member_bytes in ((args.samples, "0"), (100, str(S3_LARGE_MEMBER))):  # tiny members; ImageNet-sized
        result = run_case("s3", args.s3_shards, samples, "--member-bytes", member_bytes)
        print(json.dumps({"case": "s3", **result}), flush=True)
    print(f"load average after: {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
