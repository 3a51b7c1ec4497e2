"""The job's actor on a GPU: throughput with CPU and GPU decoding, float32 and bf16 trunk; GPU decoding's maps.

Run on a lent GPU machine by ``bench/gpu_check.sh`` (which says how). That machine has no Ray, so each case
builds the job's plan as ``cdam explain`` does (``make_plan``, ``prepare_output``) and runs the actor's class,
``ShardProcessor``, in this process, with the resources a Ray actor gets (one torch thread, the decode pool
sized to the machine): the code a Ray actor runs.

    python -m bench.gpu_job [--shards 50] [--per-shard 1000] [--output gpu_job.md]

1. ImageNet-sized synthetic JPEGs (photo-like, 500x375), written in parallel.
2. Decoding alone: the decode pool (default size: all cores) over the shards, CPU path.
3. ``--decode cpu|gpu`` x ``--precision float32|bf16``, ``--targets topk:5``, other settings at their defaults
   (the batch that fills the GPU), phase by phase: planning, the actor's start (decode pool) and configuration
   (model to the GPU, batch probe), the first shard as a warm-up, the others timed two at a time as a Ray
   actor holds them; images/s, GPU utilisation (nvidia-smi every 100 ms over the timed
   shards) and the time 50,000 images would take (start + 50,000 / rate).
4. GPU decoding against the CPU path on real photographs (scikit-image's bundled samples, as JPEG q90): the
   CDAM of the CPU path's top-1 class from both inputs; per map the relative error (max |diff| / max |CPU
   map|) and the Spearman rank correlation, and how many top-1 predictions agree.
Without CUDA (a dry run of this script) the GPU-only parts are skipped and say so.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import psutil
import torch

from bench.bench_job import random_checkpoint, write_shards
from bench.report import machine_line
from cdam_worker import CDAMExplainer, load_model
from cdam_worker.pipeline.actor import SHARDS_AT_ONCE, ShardProcessor
from cdam_worker.pipeline.decode_pool import DecodePool, DecodeSettings, GpuJpegDecoder, PreparedSample, SampleRules
from cdam_worker.pipeline.plan import make_plan
from cdam_worker.pipeline.run_output import prepare_output
from cdam_worker.shards.samples import decode_image
from jobs.cli import build_parser
from jobs.explain import explain_options

IMAGENET_SIZE = (500, 375)
EXTRAPOLATE_TO = 50_000
PHOTOS = (
    "astronaut",
    "brick",
    "camera",
    "cell",
    "chelsea",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "microaneurysms",
    "moon",
    "page",
    "retina",
    "rocket",
)


class GpuUtilisation:
    """nvidia-smi's GPU utilisation, sampled every 100 ms while in the ``with`` block; ``mean`` in percent (None without nvidia-smi)."""

    def __enter__(self) -> "GpuUtilisation":
        try:
            self._process = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        except OSError:
            self._process = None
        self.mean: float | None = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._process is None:
            return
        self._process.terminate()
        samples = [
            float(line) for line in self._process.communicate()[0].split() if line.strip().replace(".", "", 1).isdigit()
        ]
        self.mean = statistics.mean(samples) if samples else None


def make_shards(root: Path, n_shards: int, per_shard: int) -> list[str]:
    with ProcessPoolExecutor() as pool:
        list(pool.map(partial(_one_shard, root, per_shard), range(n_shards)))
    return [str(root / f"shard{s:03d}-0000.tar") for s in range(n_shards)]


def _one_shard(root: Path, per_shard: int, index: int) -> None:
    write_shards(root, f"shard{index:03d}", 1, per_shard, IMAGENET_SIZE, seed=index)


def plan_for(shards: list[str], output: Path, checkpoint: str, decode: str, precision: str):
    args = build_parser().parse_args(
        [
            "explain",
            "--shards",
            *shards,
            "--output",
            str(output),
            "--checkpoint",
            checkpoint,
            "--targets",
            "topk:5",
            "--decode",
            decode,
            "--precision",
            precision,
        ]
    )
    plan = make_plan(explain_options(args))
    prepare_output(plan, overwrite=True)
    return plan


def decode_alone(shards: list[str], checkpoint: str) -> tuple[int, float, int]:
    """(images, seconds, workers) of the CPU decode path alone over every shard."""
    plan = plan_for(shards, Path(tempfile.mkdtemp()), checkpoint, "cpu", "float32")
    pool = DecodePool(len(psutil.Process().cpu_affinity()))
    pool.wait_until_started()
    settings = DecodeSettings(plan.loaded.transform, SampleRules(False, None))
    started = time.perf_counter()
    images = 0
    for task in plan.shards:
        with pool.samples(task, settings, in_flight=512) as samples:
            images += sum(isinstance(item, PreparedSample) for item in samples)
    seconds = time.perf_counter() - started
    pool.close()
    return images, seconds, pool.workers


def run_case(shards: list[str], checkpoint: str, decode: str, precision: str, device: str) -> dict:
    """One case, phase by phase: planning, the actor's start (decode pool) and configuration (model to the GPU,
    batch probe), a warm-up shard, then the other shards timed, two at a time as a Ray actor takes them (the
    next one read and decoded while the current one is explained)."""
    started = time.perf_counter()
    plan = plan_for(shards, Path(tempfile.mkdtemp()), checkpoint, decode, precision)
    planning = time.perf_counter() - started
    started = time.perf_counter()
    processor = ShardProcessor(device, threads=1)
    processor.decoder.wait_until_started()
    actor_start = time.perf_counter() - started
    started = time.perf_counter()
    info = processor.configure(plan.config, plan.layout, plan.loaded)
    configure = time.perf_counter() - started
    started = time.perf_counter()
    processor.process_shard(plan.shards[0])
    warm_up = time.perf_counter() - started
    timed = plan.shards[1:]
    with GpuUtilisation() as utilisation, ThreadPoolExecutor(SHARDS_AT_ONCE) as shards_at_once:
        started = time.perf_counter()
        images = sum(summary.n_images for summary in shards_at_once.map(processor.process_shard, timed))
        seconds = time.perf_counter() - started
    start_seconds = planning + actor_start + configure
    processor.decoder.close()
    rate = images / seconds
    return {
        "decode": info.decode,
        "precision": precision,
        "batch": info.batch_size,
        "workers": info.decode_workers,
        "start": start_seconds,
        "phases": f"plan {planning:.1f} s, actor {actor_start:.1f} s, configure {configure:.1f} s, warm-up shard {warm_up:.1f} s",
        "images": images,
        "seconds": seconds,
        "rate": rate,
        "gpu": utilisation.mean,
        "extrapolated": start_seconds + EXTRAPOLATE_TO / rate,
    }


def photographs() -> dict[str, bytes]:
    """scikit-image's bundled sample photographs as JPEG q90 (those this installation has)."""
    import io

    from PIL import Image
    from skimage import data as samples

    photos = {}
    for name in PHOTOS:
        try:
            pixels = np.asarray(getattr(samples, name)())
        except Exception:  # noqa: BLE001 - a sample this scikit-image lacks (or would download) is skipped
            continue
        if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3):
            continue
        buffer = io.BytesIO()
        Image.fromarray(pixels).convert("RGB").save(buffer, format="JPEG", quality=90)
        photos[name] = buffer.getvalue()
    return photos


def fidelity(checkpoint: str, device: str) -> list[str]:
    """Report lines: GPU-decoded against CPU-decoded inputs and maps, on real photographs."""
    photos = photographs()
    loaded = load_model(checkpoint=checkpoint, device=device)
    cpu_inputs = torch.stack([loaded.transform(decode_image(data, name)) for name, data in photos.items()]).to(device)
    decoded = GpuJpegDecoder(loaded.transform, device).decode(list(photos.values()))
    refused = [name for name, image in zip(photos, decoded) if image is None]
    kept = [i for i, image in enumerate(decoded) if image is not None]
    gpu_inputs = torch.stack([decoded[i] for i in kept])
    cpu_inputs = cpu_inputs[kept]
    explainer = CDAMExplainer(loaded)
    on_cpu = explainer.explain(cpu_inputs, "topk:1")
    on_gpu = explainer.explain(gpu_inputs, on_cpu.target_class)
    reference, maps = on_cpu.cdam.flatten(1).double(), on_gpu.cdam.flatten(1).double()
    relative = ((maps - reference).abs().amax(1) / reference.abs().amax(1)).cpu()
    spearman = torch.stack([_pearson(_ranks(a), _ranks(b)) for a, b in zip(reference, maps)]).cpu()
    same_top1 = int((on_cpu.logits.argmax(1) == on_gpu.logits.argmax(1)).sum())
    difference = (gpu_inputs - cpu_inputs).abs()
    return [
        f"- GPU decoding against the CPU path on {len(kept)} real photographs (scikit-image samples: {', '.join(name for name in photos if name not in refused)}; JPEG q90), "
        f"CDAM of the CPU path's top-1 class, random weights: relative error per map median {relative.median():.4f}, max {relative.max():.4f}; "
        f"Spearman per map median {spearman.median():.4f}, min {spearman.min():.4f}; same top-1 {same_top1}/{len(kept)}."
        + (f" nvJPEG refused: {', '.join(refused)}." if refused else ""),
        f"- Input tensors (normalised units): max |diff| {difference.max():.3f}, mean |diff| {difference.mean():.4f}.",
    ]


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}%"


def _ranks(values: torch.Tensor) -> torch.Tensor:
    return values.argsort().argsort().double()


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a - a.mean(), b - b.mean()
    return (a * b).sum() / (a.norm() * b.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--shards", type=int, default=50)
    parser.add_argument("--per-shard", type=int, default=1000, help="(default: 50 x 1,000, ImageNet val's size)")
    parser.add_argument("--output", default="gpu_job.md")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"

    lines = [f"- Machine: {machine_line(torch.device(device), 1)}."]
    with tempfile.TemporaryDirectory(prefix="cdam-gpu-job-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        shards = make_shards(root, args.shards, args.per_shard)
        sizes = [Path(s).stat().st_size for s in shards]
        lines.append(
            f"- Data: {args.shards} shards x {args.per_shard} synthetic photo-like JPEGs of {IMAGENET_SIZE[0]}x{IMAGENET_SIZE[1]} px ({sum(sizes) / args.shards / args.per_shard / 1024:.0f} KiB each), made in {time.perf_counter() - started:.1f} s."
        )
        checkpoint = random_checkpoint(root / "model.pt", args.model)
        images, seconds, workers = decode_alone(shards, checkpoint)
        lines.append(
            f"- Decoding alone (CPU path, Pillow + the timm transform, {workers} worker processes): {images / seconds:.0f} images/s."
        )
        rows = []
        for decode in ("cpu", "gpu"):
            for precision in ("float32", "bf16"):
                if decode == "gpu" and device != "cuda":
                    lines.append(f"- `--decode gpu --precision {precision}`: skipped (no CUDA).")
                    continue
                rows.append(run_case(shards, checkpoint, decode, precision, device))
        fidelity_lines = (
            fidelity(checkpoint, device) if device == "cuda" else ["- GPU-decode fidelity: skipped (no CUDA)."]
        )
    table = [
        "",
        f"`{args.model}`, random weights, 1000 classes, `--targets topk:5`, maps float32; the actor's class in-process (one torch thread), first shard a warm-up.",
        "",
        "| `--decode` | `--precision` | batch (default) | decode workers | start-up phases | images timed | images/s | GPU utilisation | 50,000 images |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|",
        *[
            f"| {r['decode']} | {r['precision']} | {r['batch']} | {r['workers']} | {r['phases']} | {r['images']} | {r['rate']:.0f} | {_percent(r['gpu'])} | {r['extrapolated'] / 60:.1f} min |"
            for r in rows
        ],
        "",
    ]
    report = "\n".join(lines + table + fidelity_lines)
    print(report)
    Path(args.output).write_text(report + "\n")


if __name__ == "__main__":
    main()
