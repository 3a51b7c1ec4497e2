"""`cdam audit` on a run of 50,000 images x 5 targets of 14 x 14 maps: wall time and peak memory.

    python -m bench.bench_audit [--images 50000] [--classes 1000] [--keep DIR]
    python -m bench.bench_audit --images 1281167 --keep DIR --section "## Audit at ImageNet-train scale" \
        --goal-minutes 30 --goal-gib 8

``--keep DIR`` writes the run into DIR and keeps it; a later call with the same DIR reuses it.

The run is synthetic (``bench/synthetic_run.py``: the job's own writer classes, the real output format,
float16 maps, a mark planted on part of class 0); writing it is not timed. The audit runs as
``python -m jobs audit DEST`` in a subprocess, timed from start to exit, and its peak RSS comes from the
kernel's accounting of the finished child (``getrusage(RUSAGE_CHILDREN)``), next to that of
``cdam audit --help`` (the interpreter with the same imports, measured first). Results go to the
``## Audit`` section of BENCHMARKS.md (or ``--section``). Goal: under 2 minutes on the project's 2-core machine
(``--goal-minutes``; ``--goal-gib``: a peak RSS goal too).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.report import command_line, load_average, machine_line, write_section
from bench.synthetic_run import write_synthetic_run
from cdam_worker.reading import open_run

GOAL_SECONDS = 120.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument(
        "--classes", type=int, default=1000, help="classes of the synthetic model (default: 1000, 50 images each)"
    )
    parser.add_argument(
        "--keep",
        metavar="DIR",
        help="write the run here and keep it, or reuse the run already there (default: a temporary folder)",
    )
    parser.add_argument("--report", default="BENCHMARKS.md")
    parser.add_argument("--section", default="## Audit", help="the section of the report written")
    parser.add_argument("--goal-minutes", type=float, default=GOAL_SECONDS / 60)
    parser.add_argument("--goal-gib", type=float, default=None, help="a peak RSS goal (default: none)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="cdam-bench-audit-") as tmp:
        dest = args.keep or str(Path(tmp) / "run")
        reused = Path(dest, "manifest.json").exists()
        if not reused:
            started = time.perf_counter()
            write_synthetic_run(dest, args.images, n_classes=args.classes)
            print(f"wrote the synthetic run in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "jobs", "audit", "--help"], capture_output=True, check=True)
        imports_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the interpreter and its imports
        load_before = load_average()
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "jobs", "audit", dest], capture_output=True, text=True)
        seconds = time.perf_counter() - started
        peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        if done.returncode != 0:
            raise SystemExit(f"cdam audit failed ({done.returncode}):\n{done.stderr[-3000:]}")
        summary = json.loads(Path(dest, "audit", "summary.json").read_text())
        run = open_run(dest)
        n_images, n_classes, grid, n_targets = run.metadata.count_rows(), len(run.class_names), run.grid, run.n_targets

    goal_seconds = args.goal_minutes * 60
    memory_goal = (
        ""
        if args.goal_gib is None
        else f" {'met' if peak_mib < args.goal_gib * 1024 else 'NOT met'} (< {args.goal_gib:g} GiB) |"
    )
    lines = [
        args.section,
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `bench/bench_audit.py`: `cdam audit` on a synthetic run "
        f"(`bench/synthetic_run.py`, the real output format) of {n_images:,} images x {n_targets} targets (top-{n_targets}) of "
        f"{grid[0]} x {grid[1]} float16 maps, {n_classes} classes; the audit ran in a subprocess, timed from start to exit "
        "(Python start-up and imports included)."
        + (
            " The run was written by an earlier call with the same `--keep` (writing it is not timed)."
            if reused
            else ""
        ),
        "",
        f"- Machine: {machine_line(torch.device('cpu'), torch.get_num_threads())}; load average before / after: {load_before} -> {load_average()}.",
        f"- Command: `{command_line('bench.bench_audit')}`",
        "",
        f"| images | classes audited | seconds | peak RSS | goal (< {args.goal_minutes:g} min) |"
        + (" memory goal |" if memory_goal else ""),
        "|---:|---:|---:|---:|---|" + ("---|" if memory_goal else ""),
        f"| {summary['images_audited']:,} | {summary['classes_audited']} | {seconds:.1f} | {peak_mib:.0f} MiB | {'met' if seconds < goal_seconds else 'NOT met'} |"
        + memory_goal,
        "",
        f"- Of the peak RSS, {imports_mib:.0f} MiB is the interpreter with its imports (torch and the rest of the reading side; "
        f"`cdam audit --help` peaks there): the audit itself holds about {peak_mib - imports_mib:.0f} MiB.",
    ]
    report = "\n".join(lines)
    print(report)
    write_section(Path(args.report), args.section, report)


if __name__ == "__main__":
    main()
