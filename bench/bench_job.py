"""The whole ``cdam explain`` command against a plain decode + forward loop, and the decode pool on a fake GPU.

    python -m bench.bench_job [--shards 8] [--per-shard 64] [--image-size 256] [--rounds 1]

1. Small job, whole commands side by side on the same tars, each in a fresh process and timed from its
   start to its exit: the plain loop (one process, all cores: imports, model load, decode + transform +
   ``model(images)``, no CDAM, no writes) and ``cdam explain --targets topk:5`` with every default (its
   own local Ray started and shut down, actors, decode pools, writes). Goal: the job's images/s >= 0.8x
   the loop's.
2. Decode-bound job on a local Ray with a fake GPU (``num_gpus=1``, no CUDA: one actor, which computes on
   the CPU): large JPEGs and a tiny model, ``--decode-workers 1`` against the default (the node's CPUs).
   Throughput is the driver's own figure, images per second from the moment the first actor was ready to
   the end. Goal: default >= 1.6x ``--decode-workers 1``.

Results go to the ``## Job`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import timm
import torch
from PIL import Image

from bench.report import command_line, load_average, machine_line, write_section
from cdam_worker import load_model, save_checkpoint
from cdam_worker.shards.samples import Sample
from cdam_worker.shards.tar_reader import iter_samples

REPO = Path(__file__).resolve().parent.parent
TINY_VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3, num_classes=10)
# The driver's last stderr lines: the throughput after start-up, and one line per actor.
THROUGHPUT_LINE = re.compile(
    r"^actors: \d+ at the end; (\d+) images in ([\d.]+) s since the first actor was ready \(([\d.]+) images/s\)$",
    re.MULTILINE,
)
ACTOR_LINE = re.compile(
    r"^actor \d+: .*decode \w+ with (\d+) worker\(s\), batch (\d+), .*peak RSS (\d+) MiB$", re.MULTILINE
)


def write_shards(root: Path, prefix: str, n_shards: int, per_shard: int, size: tuple[int, int], seed: int = 0) -> str:
    """Photo-like JPEGs (smooth random fields plus noise) of ``size`` (width, height), with cls labels; the brace spec."""
    rng = np.random.default_rng(seed)
    width, height = size
    for s in range(n_shards):
        with tarfile.open(root / f"{prefix}-{s:04d}.tar", "w") as tar:
            for i in range(per_shard):
                coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(
                    (width, height), Image.BICUBIC
                )
                pixels = np.clip(
                    np.asarray(coarse, dtype=np.int16) + rng.integers(-20, 21, (height, width, 3)), 0, 255
                ).astype(np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
                for ext, data in (("jpg", buffer.getvalue()), ("cls", str(int(rng.integers(0, 10))).encode())):
                    info = tarfile.TarInfo(f"{prefix}-{s:04d}/{i:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(root / f"{prefix}-{{0000..{n_shards - 1:04d}}}.tar")


def plain_loop(checkpoint: str, shards: list[str], batch_size: int) -> dict[str, float]:
    """Load the model, then decode + transform + forward every image of the shards; the loop's own time."""
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
    return {"images": images, "loop_seconds": time.perf_counter() - started}


def run_plain_loop(checkpoint: str, shards: list[str], batch_size: int) -> tuple[float, dict[str, float]]:
    """The plain loop in a fresh process: (seconds from start to exit, what it reported)."""
    code = "import json, sys; from bench.bench_job import plain_loop; print(json.dumps(plain_loop(sys.argv[1], sys.argv[3:], int(sys.argv[2]))))"
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code, checkpoint, str(batch_size), *shards],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return time.perf_counter() - started, json.loads(done.stdout.strip().splitlines()[-1])


def run_command(argv: list[str]) -> tuple[float, str]:
    """``cdam explain`` in a fresh process (``python -m jobs``): (seconds from start to exit, its stderr)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "jobs", *argv], cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"the job failed with exit status {done.returncode}:\n{done.stderr[-3000:]}")
    return seconds, done.stderr


def run_in_process(argv: list[str]) -> str:
    """``cdam explain`` in this process (on the Ray it is connected to); its stderr."""
    from jobs.cli import main as cdam_main

    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):
        status = cdam_main(argv)
    if status != 0:
        raise SystemExit(f"the job failed with exit status {status}:\n{captured.getvalue()[-3000:]}")
    return captured.getvalue()


def throughput(stderr: str) -> float:
    match = THROUGHPUT_LINE.search(stderr)
    if match is None:
        raise SystemExit(f"no throughput line in the driver's output:\n{stderr[-3000:]}")
    return float(match.group(3))


def decode_ceiling(shards: list[str], transform, processes: int) -> float:
    """images/s of decode + transform alone, in a plain pool of ``processes`` processes (no actor, no Ray, no
    pixels sent back): what this machine allows the decode pool at best."""
    images = [
        (member.name, tar.extractfile(member).read())
        for shard in shards
        for tar in [tarfile.open(shard)]
        for member in tar.getmembers()
        if member.name.endswith(".jpg")
    ]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(processes, mp_context=context, initializer=_set_transform, initargs=(transform,)) as pool:
        list(pool.map(_decode_and_transform, images[: 2 * processes]))  # warm-up
        started = time.perf_counter()
        list(pool.map(_decode_and_transform, images, chunksize=4))
        return len(images) / (time.perf_counter() - started)


_transform = None


def _set_transform(transform) -> None:
    global _transform
    _transform = transform
    torch.set_num_threads(1)


def _decode_and_transform(image: tuple[str, bytes]) -> None:
    from cdam_worker.shards.samples import decode_image

    _transform(decode_image(image[1], image[0]))


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def small_job(root: Path, args: argparse.Namespace) -> tuple[list[str], bool]:
    """Section 1: report lines and whether the goal is met."""
    spec = write_shards(root, "small", args.shards, args.per_shard, (args.image_size, args.image_size))
    shards = [str(root / f"small-{s:04d}.tar") for s in range(args.shards)]
    torch.manual_seed(0)
    checkpoint = str(root / "vit.pt")
    save_checkpoint(
        checkpoint,
        timm.create_model(args.model, num_classes=1000),
        args.model,
        {"num_classes": 1000},
        [f"class_{i}" for i in range(1000)],
    )
    job = [
        "explain",
        "--shards",
        spec,
        "--output",
        str(root / "out"),
        "--checkpoint",
        checkpoint,
        "--targets",
        args.targets,
        "--overwrite",
    ]
    plains, jobs = [], []
    for _ in range(args.rounds):  # alternated, so both see the same machine
        plains.append(run_plain_loop(checkpoint, shards, 32))
        jobs.append(run_command(job))
    images = int(plains[0][1]["images"])
    plain_seconds = statistics.median(seconds for seconds, _ in plains)
    loop_seconds = statistics.median(report["loop_seconds"] for _, report in plains)
    job_seconds = statistics.median(seconds for seconds, _ in jobs)
    stderr = jobs[-1][1]
    actors = ACTOR_LINE.findall(stderr)
    ratio = plain_seconds / job_seconds
    rounds = f"median of {args.rounds} alternated rounds" if args.rounds > 1 else "one round"
    lines = [
        f"### Small job: the whole command against a plain loop ({rounds})",
        "",
        f"`{args.model}` (random weights, 1000 classes), {args.shards} shards x {args.per_shard} JPEGs of {args.image_size} px, `--targets {args.targets}`; "
        "each case is a fresh process timed from its start to its exit.",
        "",
        "| Case | images | seconds | images/s | vs plain loop |",
        "|---|---:|---:|---:|---:|",
        f"| plain loop, whole process: imports, model load, decode + transform + forward (batch 32, {psutil.cpu_count()} torch threads) | {images} | {plain_seconds:.1f} | {images / plain_seconds:.2f} | 1.00x |",
        f"| plain loop, the loop alone (no start-up) | {images} | {loop_seconds:.1f} | {images / loop_seconds:.2f} | {plain_seconds / loop_seconds:.2f}x |",
        f"| `cdam explain` with every default: Ray started and shut down, {len(actors)} actors (decode workers {', '.join(a[0] for a in actors)}; batch {actors[0][1] if actors else '?'}), Zarr + Parquet written | {images} | {job_seconds:.1f} | {images / job_seconds:.2f} | {ratio:.2f}x |",
        f"| the same job after its first actor was ready (the driver's figure) | {images} | - | {throughput(stderr):.2f} | {throughput(stderr) * plain_seconds / images:.2f}x |",
        "",
        f"- Output: {folder_bytes(root / 'out') / images / 1024:.1f} KiB per image on disk (Zarr + Parquet + markers, float32 maps).",
        f"- Peak RSS per actor process: {', '.join(f'{a[2]} MiB' for a in actors)}.",
        f"- Goal: the whole job >= 0.8x the whole plain loop: {'met' if ratio >= 0.8 else '**not met**'} ({ratio:.2f}x).",
    ]
    return lines, ratio >= 0.8


def decode_bound_job(root: Path, args: argparse.Namespace) -> tuple[list[str], bool]:
    """Section 2: report lines and whether the goal is met."""
    import ray

    width, height = args.large_size
    spec = write_shards(root, "large", args.large_shards, args.large_per_shard, (width, height), seed=1)
    torch.manual_seed(0)
    checkpoint = str(root / "tiny.pt")
    save_checkpoint(
        checkpoint,
        timm.create_model("vit_small_patch16_224", **TINY_VIT),
        "vit_small_patch16_224",
        TINY_VIT,
        [f"c{i}" for i in range(10)],
    )
    cpus = psutil.cpu_count()
    shards = [str(root / f"large-{s:04d}.tar") for s in range(args.large_shards)]
    transform = load_model(checkpoint=checkpoint).transform
    ceiling = {n: decode_ceiling(shards, transform, n) for n in (1, cpus)}
    ray.init(
        address="local",
        _node_ip_address="127.0.0.1",
        num_cpus=cpus,
        num_gpus=1,
        include_dashboard=False,
        log_to_driver=False,
    )
    try:
        rates: dict[str, list[float]] = {"1": [], "default": []}
        workers: dict[str, str] = {}
        for _ in range(args.rounds):
            for case, extra in (("1", ["--decode-workers", "1"]), ("default", [])):
                stderr = run_in_process(
                    [
                        "explain",
                        "--shards",
                        spec,
                        "--output",
                        str(root / f"out-{case}"),
                        "--checkpoint",
                        checkpoint,
                        "--targets",
                        "topk:5",
                        "--overwrite",
                        *extra,
                    ]
                )
                rates[case].append(throughput(stderr))
                workers[case] = ACTOR_LINE.findall(stderr)[0][0]
    finally:
        ray.shutdown()
    one, default = statistics.median(rates["1"]), statistics.median(rates["default"])
    images = args.large_shards * args.large_per_shard
    lines = [
        "### Decode-bound job on a fake GPU",
        "",
        f"A local Ray with {cpus} CPUs and one fake GPU (`num_gpus=1`, no CUDA): the job starts one actor (one per GPU), which "
        f"finds no CUDA and computes on the CPU. {args.large_shards} shards x {args.large_per_shard} JPEGs of {width}x{height} px, a tiny ViT "
        f"({TINY_VIT['depth']} blocks, {TINY_VIT['img_size']} px input), `--targets topk:5`; throughput is the driver's (images after the first "
        f"actor was ready / seconds), {'median of ' + str(args.rounds) + ' alternated rounds' if args.rounds > 1 else 'one round'}.",
        "",
        "| Case | decode workers | images | images/s | vs `--decode-workers 1` |",
        "|---|---:|---:|---:|---:|",
        f"| `--decode-workers 1` (a thread of the actor) | {workers['1']} | {images} | {one:.1f} | 1.00x |",
        f"| default (the node's CPUs / actors on the node) | {workers['default']} | {images} | {default:.1f} | {default / one:.2f}x |",
        "",
        f"- Goal: default >= 1.6x `--decode-workers 1`: {'met' if default / one >= 1.6 else '**not met**'} ({default / one:.2f}x).",
        f"- This machine's ceiling for the decoding alone (decode + transform of the same JPEGs in a plain process pool, no actor, no Ray, "
        f"nothing sent back): {ceiling[1]:.1f} images/s in 1 process, {ceiling[cpus]:.1f} in {cpus} ({ceiling[cpus] / ceiling[1]:.2f}x).",
    ]
    return lines, default / one >= 1.6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=256, help="side of the small job's JPEGs")
    parser.add_argument("--targets", default="topk:5")
    parser.add_argument("--large-shards", type=int, default=2)
    parser.add_argument(
        "--large-per-shard",
        type=int,
        default=192,
        help="samples per shard of the decode-bound job (long enough that start-up and the drain at each shard's end do not dominate)",
    )
    parser.add_argument(
        "--large-size", type=int, nargs=2, default=(1600, 1200), metavar=("W", "H"), help="the decode-bound job's JPEGs"
    )
    parser.add_argument("--rounds", type=int, default=1, help="alternated rounds per section (medians are reported)")
    parser.add_argument("--report", default="BENCHMARKS.md")
    args = parser.parse_args()

    load_before = load_average()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="cdam-bench-") as tmp:
        small, small_met = small_job(Path(tmp), args)
        decode, decode_met = decode_bound_job(Path(tmp), args)
    lines = [
        "## Job",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `bench/bench_job.py` (total {(time.time() - started) / 60:.1f} min).",
        "",
        f"- Machine: {machine_line(torch.device('cpu'), psutil.cpu_count())}; load average before / after: {load_before} -> {load_average()}.",
        f"- Command: `{command_line('bench.bench_job')}`",
        "",
        "| Goal | Target | Met |",
        "|---|---|---|",
        f"| Small job, whole command vs whole plain loop | >= 0.8x | {'yes' if small_met else '**no**'} |",
        f"| Decode-bound job on a fake GPU, default decode workers vs 1 | >= 1.6x | {'yes' if decode_met else '**no**'} |",
        "",
        *small,
        "",
        *decode,
    ]
    report = "\n".join(lines)
    print(report)
    write_section(Path(args.report), "## Job", report)


if __name__ == "__main__":
    main()
