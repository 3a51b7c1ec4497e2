"""How long the commands that only read a run take to answer, next to the imports they need.

    python -m bench.bench_startup DEST [--rounds 5]

DEST is a finished run (`cdam demo` makes one in ./cdam-demo-output). Each command runs in a fresh
interpreter, as a user types it, and is timed from start to exit; rounds alternate between the commands so
that the machine's load falls on all of them alike, and the median is reported. Beside them: the bare
interpreter, and ``import pyarrow, zarr, duckdb`` (what reading tables needs) and ``import torch, timm``
(what computing maps needs). Each command also says whether it imported torch. Results go to the
``## Reading commands`` section of BENCHMARKS.md. Goal: ``cdam --help``, ``cdam query`` and ``cdam verify``
under 2 s on the demo run, and none of the commands timed (also ``show``, ``report``, ``export-fiftyone`` and
``audit --no-model``) importing torch.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.report import command_line, load_average, machine_line, write_section
from cdam_worker.reading import open_run

GOAL_SECONDS = 2.0
PROBE = """\
import sys
from jobs.cli import main
try:
    sys.exit(main(sys.argv[1:]))
finally:
    print("torch imported:", "torch" in sys.modules, file=sys.stderr)
"""
"""``cdam ARGS`` as the console script runs it, saying at exit whether torch was imported."""


def commands(dest: str, scratch: str, key: str) -> dict[str, list[str]]:
    """What is timed: a label and the interpreter's arguments (``scratch``: a folder for what the commands write;
    ``key``: an image of the run)."""
    return {
        "python (bare interpreter)": ["-c", "pass"],
        "import pyarrow, zarr, duckdb": ["-c", "import pyarrow.dataset, zarr, duckdb"],
        "import torch, timm": ["-c", "import torch, timm"],
        "cdam --help": ["-c", PROBE, "--help"],
        "cdam query DEST 'SELECT count(*) ...'": ["-c", PROBE, "query", dest, "SELECT count(*) AS n FROM metadata"],
        "cdam verify DEST": ["-c", PROBE, "verify", dest],
        "cdam show DEST --key KEY -o FILE": ["-c", PROBE, "show", dest, "--key", key, "-o", f"{scratch}/show.png"],
        "cdam report DEST -o FILE": ["-c", PROBE, "report", dest, "-o", f"{scratch}/report.html"],
        "cdam export-fiftyone DEST OUT": ["-c", PROBE, "export-fiftyone", dest, f"{scratch}/fiftyone"],
        "cdam audit DEST --no-model --output DIR": [
            "-c",
            PROBE,
            "audit",
            dest,
            "--no-model",
            "--output",
            f"{scratch}/a",
        ],
    }


GOAL_COMMANDS = ("cdam --help", "cdam query", "cdam verify")
"""The commands with the speed goal; the others are timed to show what they cost without torch."""


def timed(arguments: list[str]) -> tuple[float, bool | None]:
    """Seconds from start to exit, and whether the command imported torch (None: not a cdam command)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *arguments], capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(arguments[:3])}... failed:\n{done.stderr[-2000:]}")
    marker = [line for line in done.stderr.splitlines() if line.startswith("torch imported:")]
    return seconds, (marker[-1].endswith("True") if marker else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", metavar="DEST", help="a finished run (e.g. cdam-demo-output)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--report", default="BENCHMARKS.md")
    args = parser.parse_args()
    scratch = tempfile.mkdtemp(prefix="cdam-startup-")
    key = str(open_run(args.dest).index.column("key")[0])
    timed_commands = commands(args.dest, scratch, key)
    seconds: dict[str, list[float]] = {label: [] for label in timed_commands}
    torch_imported: dict[str, bool | None] = {}
    load_before = load_average()
    for _ in range(args.rounds):
        shutil.rmtree(scratch)  # each round writes anew (an export refuses a folder that is not empty)
        os.mkdir(scratch)
        for label, arguments in timed_commands.items():
            elapsed, imported = timed(arguments)
            seconds[label].append(elapsed)
            torch_imported[label] = imported
    rows = []
    for label, values in seconds.items():
        median = statistics.median(values)
        goal = "" if not label.startswith(GOAL_COMMANDS) else ("met" if median < GOAL_SECONDS else "not met")
        imported = "-" if torch_imported[label] is None else ("yes" if torch_imported[label] else "no")
        rows.append(f"| {label} | {median:.2f} | {min(values):.2f} | {imported} | {goal} |")
        print(f"{label:42s} median {median:6.2f} s  min {min(values):6.2f} s  torch imported: {imported}")
    report = "\n".join(
        [
            "## Reading commands",
            "",
            f"`{command_line('bench.bench_startup')}`; {machine_line(torch.device('cpu'), torch.get_num_threads())}; "
            f"load average {load_before} before, {load_average()} after. Each command in a fresh interpreter, "
            f"{args.rounds} alternated rounds; goal: under {GOAL_SECONDS:.0f} s for `--help`, `query` and `verify`, "
            "and no torch for any of them.",
            "",
            "| command | median s | min s | imports torch | goal |",
            "|---|---:|---:|---|---|",
            *rows,
            "",
            "The reading commands import torch and timm only where they compute with them (the model for `evaluate`,",
            "`audit`'s confirmation, concept folders for `derive`): `cdam_worker`, `cdam_worker.audit` and",
            "`cdam_worker.derive` import their names on first use, the model's view of an image (`show`, `report`, the",
            "exports) comes from the run's data config, and the CLI reports the one-line errors of the modules a command",
            "imported.",
            "`tests/test_cli_startup.py` fails if the parser, `query`, `verify`, `show`, `report`, `export-fiftyone` or",
            "`audit --no-model` import torch, timm or Ray.",
        ]
    )
    write_section(Path(args.report), "## Reading commands", report)


if __name__ == "__main__":
    main()
