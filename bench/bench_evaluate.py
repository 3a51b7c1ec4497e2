"""`cdam evaluate`'s cost: seconds per image of every method's maps, of the deletion and insertion curves and of
one sanity and one robustness step, on ViT-S/16 at 224 px (random weights, 1000 classes; the cost does not
depend on the weights).

    python -m bench.bench_evaluate [--model vit_small_patch16_224] [--images 4] [--device cpu] [--threads N]

Each method is timed as ``cdam evaluate`` runs it (``ModelMaps``, K = 2 classes: the predicted and the
runner-up; passes sized to the memory as there), once after a warm-up on one image; the curves for one
method with 10 steps. The 1,000-image figures are extrapolated from these per-image times (everything in
``cdam evaluate`` is per image). Results go to the ``## Evaluate`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import timm
import torch

from bench.report import command_line, load_average, machine_line, write_section
from cdam_worker.evaluate import metrics
from cdam_worker.evaluate.methods import METHODS, MapOptions, ModelMaps
from cdam_worker.evaluate.perturb import deletion_curves

STEPS = 10


def timed(run) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--images", type=int, default=4, help="images per timed call (default: 4)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--methods", default="all", help="keys, comma-separated, or all (default)")
    parser.add_argument(
        "--report", default="BENCHMARKS.md", help="the file whose '## Evaluate' section is written ('-': print only)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = timm.create_model(args.model, pretrained=False).eval().to(device)
    size, patch = model.patch_embed.img_size, model.patch_embed.patch_size
    grid = (size[0] // patch[0], size[1] // patch[1])
    images = torch.randn(args.images, 3, *size, generator=torch.Generator().manual_seed(0)).to(device)
    classes = torch.stack([torch.arange(args.images), torch.arange(args.images) + 1], dim=1).to(device)
    maps = ModelMaps(model, MapOptions(tuple(patch), grid), device)
    chosen = [m for m in METHODS if args.methods == "all" or m.key in args.methods.split(",")]
    load_before = load_average()
    per_image = {}
    for method in chosen:
        maps(method.name, images[:1], classes[:1])  # warm-up
        per_image[method.name] = timed(lambda name=method.name: maps(name, images, classes)) / args.images
        print(f"{method.name}: {per_image[method.name]:.3f} s/image", flush=True)
    n_tokens = grid[0] * grid[1]
    orders = torch.from_numpy(
        metrics.deletion_orders(np.random.default_rng(0).normal(size=(args.images, n_tokens)))
    ).to(device)
    removed = torch.from_numpy(metrics.deletion_steps(n_tokens, STEPS)).to(device)
    curves = timed(lambda: deletion_curves(model, images, classes[:, 0], orders, removed, maps.rows)) / args.images
    print(f"curves: {curves:.3f} s/image/method", flush=True)

    depth = len(model.blocks)
    lines = [
        "## Evaluate",
        "",
        f"`{command_line('bench.bench_evaluate')}`; {machine_line(device, args.threads)}; load average {load_before} before, {load_average()} after.",
        f"{args.model} at {size[0]} px ({n_tokens} patch tokens), random weights, 1000 classes, {args.images} images per call, K = 2 classes",
        "per image (the predicted and the runner-up), passes sized as `cdam evaluate` sizes them; one timed call per method after a warm-up.",
        "",
        "| Method | s / image (maps, K = 2) | 1,000 images (maps + curves), extrapolated |",
        "|---|---:|---:|",
    ]
    for name, seconds in per_image.items():
        lines.append(f"| {name} | {seconds:.3f} | {(seconds + curves) * 1000 / 60:.1f} min |")
    lines += [
        f"| deletion + insertion curves ({STEPS} steps), per method | {curves:.3f} | - |",
        "",
        f"The sanity checks cost per image and method about (2 + {depth}) x its maps' time for one class (head, last block, the",
        f"{depth} cascade steps; labels one more), the robustness checks (2 + --perturbations) x, on --sanity / --robustness images.",
    ]
    section = "\n".join(lines) + "\n"
    print(section)
    if args.report != "-":
        write_section(Path(args.report), "## Evaluate", section)


if __name__ == "__main__":
    main()
