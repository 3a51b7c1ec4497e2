"""The commands that only read a run start without torch, timm or Ray (`cdam --help`, `query`, `verify`, `show`,
`report`, `export-fiftyone`, `audit --no-model`); `cdam query` and `cdam verify` answer in about the time Python
takes to import pyarrow, zarr and DuckDB (bench/bench_startup.py measures it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "timm", "ray")


def modules_after(argv: list[str]) -> tuple[int, set[str], str]:
    """Run ``cdam ARGV`` in a fresh interpreter; its exit status, which heavy modules it imported, its output."""
    script = (
        "import sys; from jobs.cli import main; status = main(sys.argv[1:]); "
        f"print('heavy:', ','.join(m for m in {HEAVY!r} if m in sys.modules)); sys.exit(status)"
    )
    done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=300, cwd=ROOT)
    heavy = done.stdout.rsplit("heavy:", 1)[-1].strip()
    return done.returncode, set(filter(None, heavy.split(","))), done.stdout + done.stderr


@pytest.mark.parametrize(
    "command, says",
    [
        (["query", "{run}", "SELECT count(*) AS n FROM metadata"], "256"),
        (["verify", "{run}"], "OK: 0 problem(s)"),
        (["show", "{run}", "--key", "test-000042", "-o", "{tmp}/figure.png"], "map scale"),
        (["report", "{run}", "-o", "{tmp}/report.html"], "wrote"),
        (["export-fiftyone", "{run}", "{tmp}/fiftyone"], "wrote 256 samples"),
        (["audit", "{run}", "--no-model", "--output", "{tmp}/audit"], "audited classes flagged: circle"),
    ],
)
def test_reading_a_run_imports_neither_torch_nor_timm_nor_ray(
    demo_run: str, tmp_path: Path, command: list[str], says: str
) -> None:
    """Tables, pictures of stored maps and exports need none of the model's maths."""
    status, heavy, output = modules_after([part.format(run=demo_run, tmp=tmp_path) for part in command])
    assert status == 0, output
    assert heavy == set(), f"cdam {command[0]} imported {sorted(heavy)}"
    assert says in output, output


def test_help_imports_neither_torch_nor_timm_nor_ray() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from jobs.cli import build_parser; build_parser(); "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"building the parser imported {done.stdout.strip()}"


def test_a_one_line_error_still_reaches_the_user_without_the_heavy_imports(tmp_path: Path) -> None:
    status, heavy, output = modules_after(["query", str(tmp_path / "no-such-run"), "SELECT 1"])
    assert status == 2 and "cdam query: error:" in output and "Traceback" not in output, output
    assert heavy == set()
