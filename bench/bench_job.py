"""The job's throughput against a plain timm inference loop over the same shards, side by side in one run.

    python -m bench.bench_job [--shards 8] [--per-shard 64] [--model vit_small_patch16_224] [--targets topk:5]

1. plain loop: one process, all cores, decode + transform + ``model(images)`` over the tars, no CDAM, no writes;
2. ``cdam explain`` with ``--targets topk:5`` on a local Ray cluster (started before the clock), 2 actors.

Also reports output bytes per image and the peak RSS of each actor process (sampled with psutil).
Results go to the ``## Job`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import io
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import timm
import torch
from PIL import Image

from bench.report import command_line, load_average, machine_line, write_section
from cdam_worker import load_model, save_checkpoint
from cdam_worker.data import Sample, iter_samples
from jobs.cli import main as cdam_main


def write_shards(root: Path, n_shards: int, per_shard: int, size: int, seed: int = 0) -> list[str]:
    """Photo-like JPEGs (smooth random fields plus noise), ``size`` px, with cls labels."""
    rng = np.random.default_rng(seed)
    paths = []
    for s in range(n_shards):
        path = root / f"bench-{s:04d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                image = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
                pixels = np.clip(np.asarray(image, dtype=np.int16) + rng.integers(-20, 21, (size, size, 3)), 0, 255).astype(np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
                for ext, data in (("jpg", buffer.getvalue()), ("cls", str(int(rng.integers(0, 1000))).encode())):
                    info = tarfile.TarInfo(f"s{s:04d}_{i:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def plain_loop(checkpoint: str, shards: list[str], batch_size: int) -> tuple[int, float]:
    """Decode + forward over every shard in this process; returns (images, seconds)."""
    torch.set_num_threads(psutil.cpu_count(logical=True))
    loaded = load_model(checkpoint=checkpoint)
    started = time.perf_counter()
    images, batch = 0, []
    with torch.no_grad():
        for shard in shards:
            for _, item in iter_samples(shard):
                if isinstance(item, Sample):
                    batch.append(loaded.transform(item.image))
                if len(batch) == batch_size:
                    loaded.model(torch.stack(batch))
                    images, batch = images + len(batch), []
        if batch:
            loaded.model(torch.stack(batch))
            images += len(batch)
    return images, time.perf_counter() - started


class ActorMemory:
    """Samples the RSS of Ray's actor processes (named ``ray::ShardProcessor...``) while a job runs."""

    def __init__(self) -> None:
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> "ActorMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            for process in psutil.process_iter(["pid", "cmdline"]):
                try:
                    if "ShardProcessor" in " ".join(process.info["cmdline"] or []):
                        self.peaks[process.pid] = max(self.peaks.get(process.pid, 0), process.memory_info().rss)
                except psutil.Error:
                    continue


def run_job(checkpoint: str, spec: str, output: str, targets: str, batch_size: int, actors: int) -> tuple[float, ActorMemory]:
    with ActorMemory() as memory:
        started = time.perf_counter()
        status = cdam_main(["explain", "--shards", spec, "--output", output, "--checkpoint", checkpoint, "--targets", targets, "--batch-size", str(batch_size), "--actors", str(actors), "--overwrite"])
        seconds = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"the job failed with exit status {status}")
    return seconds, memory


def folder_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=256, help="side of the JPEGs in the shards")
    parser.add_argument("--targets", default="topk:5")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--report", default="BENCHMARKS.md")
    args = parser.parse_args()

    import ray

    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="cdam-bench-") as tmp:
        root = Path(tmp)
        shards = write_shards(root, args.shards, args.per_shard, args.image_size)
        torch.manual_seed(0)
        model = timm.create_model(args.model, num_classes=1000)
        checkpoint = str(root / "model.pt")
        save_checkpoint(checkpoint, model, args.model, {"num_classes": 1000}, [f"class_{i}" for i in range(1000)])
        spec = str(root / f"bench-{{0000..{args.shards - 1:04d}}}.tar")

        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
        try:
            plain_images, plain_seconds = plain_loop(checkpoint, shards, args.batch_size)
            job_seconds, memory = run_job(checkpoint, spec, str(root / "out"), args.targets, args.batch_size, args.actors)
        finally:
            ray.shutdown()
        output_bytes = folder_bytes(str(root / "out"))

    plain_rate, job_rate = plain_images / plain_seconds, plain_images / job_seconds
    peaks = ", ".join(f"{rss / 2**20:.0f} MiB" for rss in sorted(memory.peaks.values())) or "not sampled"
    lines = [
        "## Job",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `bench/bench_job.py`: `{args.model}` (random weights, 1000 classes), "
        f"{args.shards} shards x {args.per_shard} JPEGs of {args.image_size} px, batch {args.batch_size}, both measured in one run on the same tars.",
        "",
        f"- Machine: {machine_line(torch.device('cpu'), psutil.cpu_count())}; load average before / after: {load_before} -> {load_average()}.",
        f"- Command: `{command_line('bench.bench_job')}`",
        "",
        "| Case | images | seconds | images/s | vs plain loop |",
        "|---|---:|---:|---:|---:|",
        f"| plain loop: decode + forward, one process, {psutil.cpu_count()} threads | {plain_images} | {plain_seconds:.1f} | {plain_rate:.2f} | 1.00x |",
        f"| `cdam explain --targets {args.targets}`, {args.actors} actors (actor start-up and model loading included) | {plain_images} | {job_seconds:.1f} | {job_rate:.2f} | {job_rate / plain_rate:.2f}x |",
        "",
        f"- Output: {output_bytes / plain_images / 1024:.1f} KiB per image on disk (Zarr + Parquet + markers, float32 maps).",
        f"- Peak RSS per actor process: {peaks}.",
        f"- Goal: job >= 0.8x the plain loop: {'met' if job_rate / plain_rate >= 0.8 else 'NOT met'} ({job_rate / plain_rate:.2f}x).",
    ]
    report = "\n".join(lines)
    print(report)
    write_section(Path(args.report), "## Job", report)


if __name__ == "__main__":
    main()
