"""Engine benchmark: plain forward, closed-form CDAM, autograd CDAM, Captum, Smooth CDAM and a bf16 trunk, side by side.

Everything runs in one process on the same random-weight model and the same batch. The timed cases are
interleaved round by round (case A, case B, ..., then again), so a change in machine load hits every case
alike; each number is the median over the rounds, after one warm-up round. Captum runs in exact float32
(no TF32 on CUDA), like the engine's float32 maps it is checked against. Smooth CDAM is timed in float32 and
with bf16 (trunk and copies, and trunk only), and its bf16 maps are compared with float32 copies next to
Smooth's own sampling error (two seeds).

    python -m bench.bench_engine                       # CPU defaults: vit_small_patch16_224, batch 8, 224 px
    python -m bench.bench_engine --device cuda --batch 64 --repeats 10

Writes the results as the ``## Engine`` section of ``BENCHMARKS.md`` (other sections are kept) and prints
the same markdown to stdout. Captum's cost for K=1000 targets is extrapolated from a few targets.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import timm
import torch

from bench.report import command_line, load_average, machine_line, write_section
from cdam_worker import CDAMExplainer, VariantConfig
from cdam_worker.maps.engine import cuda_fp32_precision

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Engine"
GOAL_FORWARD_RATIO = 1.0  # all-class CDAM throughput / plain forward throughput, at least
GOAL_CAPTUM_SPEEDUP = 1000.0  # Captum (K=1000) time / closed form (K=1000) time, at least
GOAL_SMOOTH_RATIO = 3.0  # Smooth m=50 time / vanilla time (K=1), at most
AGREEMENT = 1e-4  # max |diff| / max |ref| in float32 (spec section 4)


@dataclass
class Case:
    """One timed thing: ``run()`` does one batch; ``repeats`` timed rounds after one warm-up call."""

    key: str
    label: str
    targets: str
    run: Callable[[], object]
    repeats: int
    warmup: Callable[[], object] | None = None  # a cheaper warm-up (default: run itself)
    times: list[float] = field(default_factory=list)  # wall clock per round
    cpu_times: list[float] = field(default_factory=list)  # process CPU time (all threads) per round

    @property
    def seconds(self) -> float:
        return statistics.median(self.times)

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def cpu_seconds(self) -> float:
        return statistics.median(self.cpu_times)


@dataclass
class Row:
    label: str
    targets: str
    seconds: float  # median wall clock
    best: float  # fastest round
    cpu_seconds: float | None
    note: str


def paired_ratio(numerator: Case, denominator: Case) -> float:
    """Median over rounds of numerator time / denominator time, both from the same round (same load)."""
    rounds = min(len(numerator.times), len(denominator.times))
    return statistics.median(numerator.times[r] / denominator.times[r] for r in range(rounds))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--model", default="vit_small_patch16_224", help="timm model name (random weights)")
    parser.add_argument("--num-classes", type=int, default=1000, help="classes of the model's head (K for 'all')")
    parser.add_argument("--batch", type=int, default=8, help="images per batch")
    parser.add_argument("--img-size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: all cores)"
    )
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds of the cheap cases (median reported)")
    parser.add_argument(
        "--slow-repeats",
        type=int,
        default=2,
        help="timed rounds of the slow cases (Captum, autograd with many targets)",
    )
    parser.add_argument(
        "--captum-targets", type=int, default=5, help="targets Captum is timed (and checked) on; K=1000 is extrapolated"
    )
    parser.add_argument("--smooth-samples", type=int, default=50, help="m of Smooth CDAM")
    parser.add_argument(
        "--autograd-all",
        choices=["auto", "run", "skip"],
        default="auto",
        help="autograd path with all classes: run it, skip it, or run it when one full chunk's extrapolation fits --autograd-all-budget",
    )
    parser.add_argument(
        "--autograd-all-budget",
        type=float,
        default=60.0,
        help="seconds allowed for one autograd all-class run under --autograd-all auto",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=ROOT / "BENCHMARKS.md",
        help="markdown file whose '## Engine' section is replaced",
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave the markdown file alone")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu_start


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.float() - reference.float()).abs().max() / reference.float().abs().max()).item()


def median_correlation(value: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Median and minimum Pearson r over the maps (B, K, ...) -> per (image, target) map."""
    a = value.float().flatten(2)
    b = reference.float().flatten(2)
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    r = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-30)
    return r.median().item(), r.min().item()


def multiply_adds(model, num_targets: int) -> tuple[float, float, float]:
    """Per image: multiply-adds of (a plain forward, closed-form CDAM with num_targets > N, the last block) of a plain ViT.

    Counts the matrix products only (patch embedding, qkv, attention, proj, MLP, head); the closed form
    replaces the last block by the patch values, proj and MLP pushed for the N patch columns, and the
    K x D x N product with the target directions.
    """
    dim, tokens = model.num_features, model.patch_embed.num_patches + model.num_prefix_tokens
    patches = model.patch_embed.num_patches
    hidden = model.blocks[-1].mlp.fc1.out_features
    patch_pixels = 3 * model.patch_embed.patch_size[0] * model.patch_embed.patch_size[1]
    per_token = 4 * dim * dim + 2 * dim * hidden  # qkv + proj + fc1 + fc2
    block = tokens * per_token + 2 * tokens * tokens * dim  # + attention scores and mixing
    trunk = patches * patch_pixels * dim + (len(model.blocks) - 1) * block
    head = dim * model.num_classes
    replacement = (
        patches * (2 * dim * dim + 2 * dim * hidden) + num_targets * dim * patches
    )  # values, proj, MLP; directions
    return trunk + block + head, trunk + replacement + head, block


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    load_before = load_average()

    model = (
        timm.create_model(args.model, pretrained=False, num_classes=args.num_classes, img_size=args.img_size)
        .eval()
        .to(device)
    )
    generator = torch.Generator().manual_seed(args.seed + 1)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=generator).to(device)
    keys = [f"bench/{i:06d}" for i in range(args.batch)]
    num_classes = args.num_classes
    prefix = model.num_prefix_tokens

    closed = CDAMExplainer(model)
    autograd = CDAMExplainer(model, method="autograd")
    bf16 = CDAMExplainer(model, precision="bf16")  # Smooth's copies in bf16 too
    bf16_float32_copies = CDAMExplainer(model, precision="bf16", variant_precision="float32")
    tf32 = CDAMExplainer(model, precision="tf32") if device.type == "cuda" else None  # TF32 exists on CUDA only
    if closed.method != "closed_form":
        raise SystemExit(
            f"{args.model}: the closed form does not hold ({closed.method_reason}); this benchmark compares it with the rest"
        )
    smooth = VariantConfig("smooth", n_samples=args.smooth_samples)
    tokens = model.patch_embed.num_patches + prefix
    chunk_targets = max(1, autograd.rows_per_pass(tokens) // args.batch)  # targets per autograd backward pass

    def explain(explainer: CDAMExplainer, targets, **kwargs):
        with torch.no_grad():
            return explainer.explain(images, targets, **kwargs)

    def forward():
        with torch.no_grad():
            return model(images)

    # Captum over a few targets: the classes most predicted over the batch
    from captum.attr import LayerGradientXActivation

    captum = LayerGradientXActivation(model, model.blocks[-1].norm1)
    with torch.no_grad():
        captum_classes = model(images).mean(0).topk(min(args.captum_targets, num_classes)).indices.tolist()

    def captum_maps(classes: list[int]) -> torch.Tensor:
        with cuda_fp32_precision(device, "ieee"):  # the reference in exact float32: no TF32 convolutions on CUDA
            maps = [captum.attribute(images, target=c).sum(-1)[:, prefix:] for c in classes]  # (B, N) each
        return torch.stack(maps, dim=1).detach()

    k10 = min(10, num_classes)
    smooth_label = f"Smooth CDAM m={args.smooth_samples}, closed form"
    cases = [
        Case("forward", "plain forward `model(images)`", "-", forward, args.repeats),
        Case("cfall", "CDAM, closed form", f"{num_classes} (all)", lambda: explain(closed, "all"), args.repeats),
        Case("cf1", "CDAM, closed form", "1", lambda: explain(closed, "topk:1"), args.repeats),
        Case("sm1", smooth_label, "1", lambda: explain(closed, "topk:1", keys=keys, variant=smooth), args.repeats),
        Case("cf10", "CDAM, closed form", str(k10), lambda: explain(closed, f"topk:{k10}"), args.repeats),
        Case(
            "sm10",
            smooth_label,
            str(k10),
            lambda: explain(closed, f"topk:{k10}", keys=keys, variant=smooth),
            args.repeats,
        ),
        Case("ag1", "CDAM, autograd through the last block", "1", lambda: explain(autograd, "topk:1"), args.repeats),
        Case(
            "ag10",
            "CDAM, autograd through the last block",
            str(k10),
            lambda: explain(autograd, f"topk:{k10}"),
            args.repeats,
        ),
        Case("bf1", "CDAM, closed form, bf16 trunk", "1", lambda: explain(bf16, "topk:1"), args.repeats),
        Case(
            "smbf1",
            f"{smooth_label}, bf16 trunk and copies",
            "1",
            lambda: explain(bf16, "topk:1", keys=keys, variant=smooth),
            args.repeats,
        ),
        Case(
            "smbf1f",
            f"{smooth_label}, bf16 trunk, float32 copies",
            "1",
            lambda: explain(bf16_float32_copies, "topk:1", keys=keys, variant=smooth),
            args.repeats,
        ),
        Case(
            "bfall", "CDAM, closed form, bf16 trunk", f"{num_classes} (all)", lambda: explain(bf16, "all"), args.repeats
        ),
        Case(
            "captum",
            "Captum `LayerGradientXActivation` at `blocks[-1].norm1`, loop over targets",
            str(len(captum_classes)),
            lambda: captum_maps(captum_classes),
            args.slow_repeats,
            warmup=lambda: captum_maps(captum_classes[:1]),
        ),
    ]
    if tf32 is not None:
        cases.append(
            Case(
                "tfall",
                "CDAM, closed form, TF32 trunk",
                f"{num_classes} (all)",
                lambda: explain(tf32, "all"),
                args.repeats,
            )
        )
    if chunk_targets < num_classes and args.autograd_all != "skip":
        cases.append(
            Case(
                "agchunk",
                "CDAM, autograd through the last block",
                f"{chunk_targets} (one backward chunk)",
                lambda: explain(autograd, list(range(chunk_targets))),
                args.slow_repeats,
            )
        )

    log(f"device {device}, {args.threads} threads, load average {load_before}; warm-up round")
    for case in cases:
        (case.warmup or case.run)()
    rounds = max(case.repeats for case in cases)
    for round_index in range(rounds):
        for case in cases:
            if round_index < case.repeats:
                seconds, cpu_seconds = timed(case.run, device)
                case.times.append(seconds)
                case.cpu_times.append(cpu_seconds)
        log(f"round {round_index + 1}/{rounds} done ({time.perf_counter() - started:.0f} s so far)")
    for case in cases:
        log(
            f"{case.key:>8}: wall {' '.join(f'{t:.3f}' for t in case.times)} | cpu {' '.join(f'{t:.2f}' for t in case.cpu_times)}"
        )
    by_key = {case.key: case for case in cases}

    # autograd with every class: measured once, or extrapolated from one full chunk
    autograd_all: Row | None = None
    if "agchunk" in by_key:
        chunk = by_key["agchunk"]
        backward_rows = min(num_classes, model.num_features)  # with K > D the maps go through the D-row basis
        chunks = -(-backward_rows // chunk_targets)
        estimate = chunk.seconds * chunks
        label, targets = "CDAM, autograd through the last block", f"{num_classes} (all)"
        if args.autograd_all == "run" or (args.autograd_all == "auto" and estimate <= args.autograd_all_budget):
            log(f"autograd, all {num_classes} classes (estimated {estimate:.0f} s)")
            seconds, cpu_seconds = timed(lambda: explain(autograd, "all"), device)
            via = (
                f"; through the basis: {backward_rows} backward rows per image, not {num_classes}"
                if backward_rows < num_classes
                else ""
            )
            autograd_all = Row(label, targets, seconds, seconds, cpu_seconds, f"measured once (1 run){via}")
        else:
            autograd_all = Row(
                label,
                targets,
                estimate,
                chunk.best * chunks,
                chunk.cpu_seconds * chunks,
                f"**extrapolated**: {chunks} chunks ({backward_rows} backward rows) x the one-chunk time above "
                f"(not run: the estimate exceeds --autograd-all-budget {args.autograd_all_budget:.0f} s)",
            )

    # -- correctness checks on the same batch ---------------------------------------------------
    log("agreement checks")
    reference = captum_maps(captum_classes)  # (B, k, N)
    fast = explain(closed, captum_classes).cdam.flatten(2)
    captum_error = relative_error(fast, reference)
    autograd_error = relative_error(explain(autograd, f"topk:{k10}").cdam, explain(closed, f"topk:{k10}").cdam)
    exact_all = explain(closed, "all").cdam
    approx_all = explain(bf16, "all").cdam
    bf16_error = relative_error(approx_all, exact_all)
    smooth_classes = explain(closed, f"topk:{k10}").target_class  # the same classes for every precision
    smooth_exact = explain(closed, smooth_classes, keys=keys, variant=smooth).cdam
    smooth_other_seed = explain(
        closed,
        smooth_classes,
        keys=keys,
        variant=VariantConfig("smooth", n_samples=args.smooth_samples, seed=smooth.seed + 1),
    ).cdam
    smooth_bf16_float32_copies = explain(bf16_float32_copies, smooth_classes, keys=keys, variant=smooth).cdam
    smooth_bf16 = explain(bf16, smooth_classes, keys=keys, variant=smooth).cdam
    smooth_moves = {  # what: (max |diff| / max |ref|, median and min Pearson r per map)
        what: (relative_error(value, reference), *median_correlation(value, reference))
        for what, (value, reference) in {
            "its own sampling error, seed 0 vs seed 1 (float32)": (smooth_other_seed, smooth_exact),
            "bf16 copies vs float32 copies (both with a bf16 trunk)": (smooth_bf16, smooth_bf16_float32_copies),
            "bf16 trunk vs float32 trunk (both with float32 copies)": (smooth_bf16_float32_copies, smooth_exact),
            "bf16 trunk and copies vs float32 throughout": (smooth_bf16, smooth_exact),
        }.items()
    }
    bf16_corr_median, bf16_corr_min = median_correlation(approx_all, exact_all)
    tf32_all = explain(tf32, "all").cdam if tf32 is not None else None
    load_after = load_average()
    total = time.perf_counter() - started

    # -- report ---------------------------------------------------------------------------------
    forward = by_key["forward"]
    captum_case = by_key["captum"]
    n_captum = len(captum_classes)
    rows = [
        Row(c.label, c.targets, c.seconds, c.best, c.cpu_seconds, f"median of {len(c.times)}")
        for c in cases
        if c.key != "captum"
    ]
    if autograd_all is not None:
        rows.append(autograd_all)
    else:
        why = (
            f"all {num_classes} classes fit in one backward chunk"
            if chunk_targets >= num_classes
            else "skipped (--autograd-all skip)"
        )
        rows.append(
            Row("CDAM, autograd through the last block", f"{num_classes} (all)", float("nan"), float("nan"), None, why)
        )
    rows.append(
        Row(
            captum_case.label,
            str(n_captum),
            captum_case.seconds,
            captum_case.best,
            captum_case.cpu_seconds,
            f"median of {len(captum_case.times)}; {captum_case.seconds / n_captum:.2f} s per target",
        )
    )
    scale = num_classes / n_captum
    rows.append(
        Row(
            captum_case.label,
            f"{num_classes} (all)",
            captum_case.seconds * scale,
            captum_case.best * scale,
            captum_case.cpu_seconds * scale,
            f"**extrapolated** from {n_captum} targets (x {scale:g})",
        )
    )
    order = [
        "forward",
        "cf1",
        "cf10",
        "cfall",
        "ag1",
        "ag10",
        "agchunk",
        "agall",
        "sm1",
        "sm10",
        "bf1",
        "bfall",
        "smbf1",
        "smbf1f",
        "tfall",
        "captum",
        "captumall",
    ]
    keyed = {c.key: r for c, r in zip([c for c in cases if c.key != "captum"], rows)}
    keyed.update(agall=rows[-3], captum=rows[-2], captumall=rows[-1])
    rows = [keyed[key] for key in order if key in keyed]

    # goal ratios: paired per round (same load) and from the fastest rounds
    def ratios(numerator: Case, denominator: Case, factor: float = 1.0) -> tuple[float, float, float]:
        """(paired median, best-of, CPU-time median) of numerator time / denominator time."""
        return (
            paired_ratio(numerator, denominator) * factor,
            numerator.best * factor / denominator.best,
            numerator.cpu_seconds * factor / denominator.cpu_seconds,
        )

    forward_ratio = ratios(forward, by_key["cfall"])
    captum_speedup = ratios(captum_case, by_key["cfall"], scale)
    smooth_ratio = ratios(by_key["sm1"], by_key["cf1"])
    smooth_bf16_ratio = ratios(by_key["smbf1"], by_key["bf1"])
    smooth_bf16_float32_copies_ratio = (
        paired_ratio(by_key["smbf1f"], by_key["bf1"]),
        by_key["smbf1f"].best / by_key["bf1"].best,
    )
    smooth10_ratio = (paired_ratio(by_key["sm10"], by_key["cf10"]), by_key["sm10"].best / by_key["cf10"].best)
    bf16_ratio = (paired_ratio(by_key["cf1"], by_key["bf1"]), by_key["cf1"].best / by_key["bf1"].best)
    bf16_all_ratio = (paired_ratio(by_key["cfall"], by_key["bfall"]), by_key["cfall"].best / by_key["bfall"].best)

    def met(values: tuple[float, float, float], ok: Callable[[float], bool]) -> str:
        verdicts = ["yes" if ok(value) else "**no**" for value in values]
        if len(set(verdicts)) == 1:
            return verdicts[0]
        return f"{verdicts[0]} (paired median); best-of: {verdicts[1]}; CPU time: {verdicts[2]}"

    def fmt(value: float | None, digits: int = 3) -> str:
        return "-" if value is None or value != value else f"{value:.{digits}f}"

    shared = device.type == "cpu"
    smooth_images, smooth_copies = closed.variant_chunks(args.batch, tokens, smooth)
    forward_macs, closed_macs, block_macs = multiply_adds(model, num_classes)
    block_share = block_macs / forward_macs
    lines = [
        SECTION,
        "",
        f"Measured {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} by `bench/bench_engine.py`: "
        f"`{args.model}` with random weights and a {num_classes}-class head, one batch of {args.batch} random "
        f"{args.img_size}x{args.img_size} images on `{device}`. All cases ran in one process on the same model and batch, "
        "interleaved round by round (every case once per round) after one warm-up round. "
        "Times are wall clock per batch: the median over rounds, and the fastest round (best-of); "
        "CPU s is the process's CPU time (all threads) per batch, median over rounds.",
        "",
        f"- Machine: {machine_line(device, args.threads)}.",
        f"- Load average (1/5/15 min) before / after: {load_before} -> {load_after}"
        + (
            ". The machine was shared with other work during the run, so absolute times are inflated and noisy; "
            "the goal ratios below are therefore given three ways: the median of per-round ratios (the two cases ran "
            "back to back in each round, under the same load), the ratio of best-of times, and the ratio of median "
            "CPU times (least sensitive to other processes when torch runs one thread; with several threads, "
            "threads waiting on a descheduled sibling also burn CPU time)."
            if shared
            else "."
        ),
        f"- Command: `{command_line('bench.bench_engine')}` (total {total / 60:.1f} min).",
        "",
        "| Case | Targets K | s / batch (median) | s / batch (best) | images/s (median) | images/s (best) | vs plain forward (median) | CPU s | Notes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        if row.seconds != row.seconds:
            lines.append(f"| {row.label} | {row.targets} | - | - | - | - | - | - | {row.note} |")
            continue
        lines.append(
            f"| {row.label} | {row.targets} | {row.seconds:.3f} | {row.best:.3f} | {args.batch / row.seconds:.3g} | {args.batch / row.best:.3g} | "
            f"{forward.seconds / row.seconds:.3g}x | {fmt(row.cpu_seconds, 2)} | {row.note} |"
        )
    lines += [
        "",
        "| Goal | Target | Paired median | Best-of | CPU time | Met |",
        "|---|---|---:|---:|---:|---|",
        f"| All-class CDAM (K={num_classes}, closed form) throughput / plain forward throughput | >= {GOAL_FORWARD_RATIO:.1f}x | "
        f"{forward_ratio[0]:.2f}x | {forward_ratio[1]:.2f}x | {forward_ratio[2]:.2f}x | {met(forward_ratio, lambda v: v >= GOAL_FORWARD_RATIO)} |",
        f"| Speed-up vs Captum at K={num_classes} (Captum extrapolated from {n_captum} targets) | >= {GOAL_CAPTUM_SPEEDUP:.0f}x | "
        f"{captum_speedup[0]:.0f}x | {captum_speedup[1]:.0f}x | {captum_speedup[2]:.0f}x | {met(captum_speedup, lambda v: v >= GOAL_CAPTUM_SPEEDUP)} |",
        f"| Smooth CDAM m={args.smooth_samples} time / vanilla time, K=1 | <= {GOAL_SMOOTH_RATIO:.0f}x | "
        f"{smooth_ratio[0]:.2f}x | {smooth_ratio[1]:.2f}x | {smooth_ratio[2]:.2f}x | {met(smooth_ratio, lambda v: v <= GOAL_SMOOTH_RATIO)} |",
        f"| Smooth CDAM m={args.smooth_samples} time / vanilla time, K=1, both with `precision=bf16` (Smooth's copies in bf16) | <= {GOAL_SMOOTH_RATIO:.0f}x | "
        f"{smooth_bf16_ratio[0]:.2f}x | {smooth_bf16_ratio[1]:.2f}x | {smooth_bf16_ratio[2]:.2f}x | {met(smooth_bf16_ratio, lambda v: v <= GOAL_SMOOTH_RATIO)} |",
        "",
        f"Arithmetic ceiling of the first goal: per image, a plain forward is {forward_macs / 1e9:.2f} G multiply-adds and all-class "
        f"CDAM by the closed form {closed_macs / 1e9:.2f} G (the last block, {block_share:.0%} of the forward, is replaced by pushing "
        f"the {model.patch_embed.num_patches} patch columns through the CLS path and one K x D x N product), so no implementation of "
        f"these products can exceed {forward_macs / closed_macs:.3f}x on this model; the measured ratio is to be read against that.",
        "",
        "Agreement, precision and other ratios on the same batch:",
        "",
        f"- Closed form vs Captum on the {n_captum} Captum targets (classes {captum_classes}): max |diff| / max |ref| = "
        f"{captum_error:.1e} (limit {AGREEMENT:.0e}: {'ok' if captum_error <= AGREEMENT else '**exceeded**'}).",
        f"- Autograd path vs closed form, K={k10}: max |diff| / max |ref| = {autograd_error:.1e}.",
        f"- bf16 trunk vs float32, all {num_classes} classes: max |diff| / max |ref| = {bf16_error:.2e}; Pearson r per (image, class) map: "
        f"median {bf16_corr_median:.5f}, min {bf16_corr_min:.5f}. Time float32 / bf16 (paired median, best-of): "
        f"K=1 {bf16_ratio[0]:.2f}x, {bf16_ratio[1]:.2f}x; K={num_classes} {bf16_all_ratio[0]:.2f}x, {bf16_all_ratio[1]:.2f}x "
        f"({'on this CPU; the GPU speed-up of bf16 is not measured here' if shared else 'on this GPU'}). "
        "Random weights: the error on a trained model may differ.",
        f"- Smooth CDAM m={args.smooth_samples} / vanilla at K={k10} (paired median, best-of): {smooth10_ratio[0]:.2f}x, {smooth10_ratio[1]:.2f}x. "
        f"Smooth re-runs only the last block's closed form on the {args.smooth_samples} noisy copies of its input "
        f"(chunks of {smooth_images} images x {smooth_copies} copies). With a bf16 trunk and float32 copies, Smooth / vanilla bf16 at K=1 "
        f"(paired median, best-of): {smooth_bf16_float32_copies_ratio[0]:.2f}x, {smooth_bf16_float32_copies_ratio[1]:.2f}x.",
        f"- What moves the Smooth maps (m={args.smooth_samples}, the top {k10} float32 classes; max |diff| / max |ref| over the batch, "
        "and Pearson r per (image, class) map, median and min): "
        + "; ".join(
            f"{what}: {error:.2e}, r {r_median:.5f} / {r_min:.5f}"
            for what, (error, r_median, r_min) in smooth_moves.items()
        )
        + ". Two seeds differ by about sqrt(2) times the sampling error of one map. Random weights: a trained model may differ.",
    ]
    if tf32_all is not None:
        tf32_corr_median, tf32_corr_min = median_correlation(tf32_all, exact_all)
        tf32_ratio = (paired_ratio(by_key["cfall"], by_key["tfall"]), by_key["cfall"].best / by_key["tfall"].best)
        lines.append(
            f"- TF32 trunk vs float32, all {num_classes} classes: max |diff| / max |ref| = {relative_error(tf32_all, exact_all):.2e}; "
            f"Pearson r per map: median {tf32_corr_median:.5f}, min {tf32_corr_min:.5f}. Time float32 / TF32 (paired median, best-of): "
            f"{tf32_ratio[0]:.2f}x, {tf32_ratio[1]:.2f}x."
        )
    if autograd_all is not None:
        lines.append(
            f"- Autograd path at K={num_classes}: {autograd_all.seconds:.1f} s per batch ({autograd_all.note.split(':')[0].strip('*')}); "
            f"the closed form is {autograd_all.seconds / by_key['cfall'].seconds:.0f}x faster there (medians)."
        )
    lines.append("")
    section = "\n".join(lines)

    print(section)
    if not args.no_write:
        write_section(args.output, SECTION, section)
        log(f"wrote the '{SECTION}' section of {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
