"""The audit's benchmark family: planted marks and backgrounds, learnt or not, found or not, image by image.

    python -m bench.audit_family [--cues all|NAME,...] [--samples 512] [--cache-dir DIR] [--keep DIR] [--report BENCHMARKS.md]

For each cue of ``CUES`` (``bench/planted.py``: a mark at the corner, along the top edge or anywhere, in
two sizes, the mark anywhere also with a poisoned training split; a water background) it trains the demo's
tiny ViT with one block on the cue's training split (the cue on 92-95% of one class's images and 3% of the
others', 10% when poisoned; cached) and a clean control on the same images with the cue on 30% of every
class (nothing to learn), renders the test splits (``balanced``: the cue on half
of every class; ``correlated``: the training shares), and runs the real ``cdam explain --targets all``
and ``cdam audit`` on each. Per case it reports:

- the planted class's rank, and which classes are flagged (the control should flag none);
- the finding's kind, as the audit names it;
- the precision of the flagged images (of every class) against the images that carry the cue, and the
  recall over the cue images predicted as the planted class (those whose map of it the audit reads);
- the model's share of the other classes' cue images it calls the planted class (how much the
  shortcut tips them over).

Results go to the ``## Audit benchmark family`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.planted import Cue, train_model, write_shards
from cdam_worker.demo_assets import CLASS_NAMES, DemoConfig
from cdam_worker.reading import open_run
from jobs.cli import main as cdam

CUES = [
    Cue("mark", 0, "corner", 8),
    Cue("mark", 1, "edge", 8),
    Cue("mark", 1, "edge", 14),
    Cue("mark", 2, "anywhere", 8),
    Cue("mark", 2, "anywhere", 14),
    Cue("mark", 2, "anywhere", 8, poisoned=True),
    Cue("mark", 2, "anywhere", 14, poisoned=True),
    Cue("background", 3),
]
CASES = (("shortcut", "balanced"), ("shortcut", "correlated"), ("control", "balanced"))
CONFIG = DemoConfig(depth=1)
"""The demo's ViT with one block (about a minute of training on one free core)."""


@dataclass
class CaseResult:
    """One audited test split of one model."""

    cue: str
    model: str  # "shortcut" or "control"
    split: str
    planted: str  # the cue's class
    rank: int | None  # the planted class's rank (None: not audited)
    flagged: list[str]
    kinds: list[str]  # the kinds of the planted class's flagged clusters
    precision: float | None
    recall: float | None
    cue_images: int  # cue images predicted as the planted class
    tipped: float  # share of the other classes' cue images predicted as the planted class
    dest: str  # the audited run

    def row(self) -> str:
        """The case as a line of the Markdown table (``HEADER``)."""

        def number(value: float | None) -> str:
            return "-" if value is None else f"{value:.2f}"

        flags = ", ".join(self.flagged) or "none"
        return (
            f"| {self.cue} | {self.model} | {self.split} | {self.planted} | {self.rank or '-'} | {flags} | {', '.join(self.kinds) or '-'} "
            f"| {number(self.precision)} | {number(self.recall)} | {self.cue_images} | {self.tipped:.2f} |"
        )


HEADER = (
    "| cue | model | test split | planted class | its rank | classes flagged | kind | precision | recall | cue images | tipped |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def explain_every_class_argv(shards: Sequence[Path], dest: str, checkpoint: Path) -> list[str]:
    """``cdam explain`` of ``shards`` into ``dest`` with every class's map, on two actors."""
    return [
        "explain",
        "--shards",
        *map(str, shards),
        "--output",
        dest,
        "--checkpoint",
        str(checkpoint),
        "--targets",
        "all",
        "--actors",
        "2",
    ]


def run_case(cue: Cue, model: str, split: str, root: Path, cache_dir: Path, samples: int) -> CaseResult:
    """Train (or reuse) the model, explain the split with every class's map, audit it and score the audit."""
    checkpoint = train_model(cache_dir, cue, control=model == "control", config=CONFIG)
    shards = write_shards(root / cue.name / "shards", cue, split, 4, samples // 4, seed=0)
    dest = str(root / cue.name / f"{model}-{split}")
    if cdam(explain_every_class_argv(shards, dest, checkpoint)) != 0:
        raise RuntimeError(f"cdam explain failed on {dest}")
    if cdam(["audit", dest, "--no-model"]) != 0:
        raise RuntimeError(f"cdam audit failed on {dest}")
    return score_case(dest, cue, model, split)


def score_case(dest: str, cue: Cue, model: str, split: str) -> CaseResult:
    """Compare an audited run with the ground truth in its samples' metadata."""
    run = open_run(dest)
    meta = {
        row["key"]: json.loads(row["sample_json"])
        for row in run.metadata.to_table(columns=["key", "sample_json"]).to_pylist()
    }
    classes = run.table("audit/classes.parquet").to_pylist()
    clusters = run.table("audit/clusters.parquet").to_pylist()
    images = run.table("audit/images.parquet").to_pylist()
    index = run.index.to_pylist()
    rank = next((row["rank"] for row in classes if row["class"] == cue.cue_class), None)
    flagged = [row["class_name"] for row in sorted(classes, key=lambda r: r["rank"]) if row["flagged"]]
    kinds = sorted({row["kind"] for row in clusters if row["class"] == cue.cue_class and row["flagged"]})
    carries = np.array([_carries(meta[row["key"]]) for row in images], dtype=bool)
    is_flagged = np.array([row["flagged"] for row in images], dtype=bool)
    in_class = np.array([row["class"] == cue.cue_class for row in images], dtype=bool)
    precision = float((carries & is_flagged).sum() / is_flagged.sum()) if is_flagged.any() else None
    cue_in_class = carries & in_class
    if model == "control" or not cue_in_class.any():
        recall = None  # a clean control has nothing planted to find
    else:
        recall = float((cue_in_class & is_flagged).sum() / cue_in_class.sum()) if flagged else 0.0
    others = [row for row in index if row["label"] != cue.cue_class and _carries(meta[row["key"]])]
    tipped = sum(row["pred"] == cue.cue_class for row in others) / max(len(others), 1)
    return CaseResult(
        cue.name,
        model,
        split,
        CLASS_NAMES[cue.cue_class],
        rank,
        flagged,
        kinds,
        precision,
        recall,
        int(cue_in_class.sum()),
        tipped,
        dest,
    )


def _carries(sample: dict) -> bool:
    """Whether a sample carries the planted cue: ``cue`` (bench/planted.py) or the demo's ``watermark``."""
    return bool(sample["cue"] if "cue" in sample else sample["watermark"])


def main() -> None:
    import ray

    from bench.report import command_line, load_average, machine_line, write_section
    from jobs.demo import default_cache_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cues", default="all", help="comma-separated cue names (" + ", ".join(c.name for c in CUES) + ") or all"
    )
    parser.add_argument("--samples", type=int, default=512, help="images per test split (default: 512)")
    parser.add_argument(
        "--cache-dir", default=None, help="trained models are kept here (default: the demo's cache folder, planted/)"
    )
    parser.add_argument(
        "--keep",
        default=None,
        help="write the shards and audited runs here and keep them (default: a temporary folder)",
    )
    parser.add_argument("--report", default="BENCHMARKS.md")
    args = parser.parse_args()
    wanted = CUES if args.cues == "all" else [c for c in CUES if c.name in args.cues.split(",")]
    if not wanted:
        parser.error(f"--cues {args.cues!r}: none of " + ", ".join(c.name for c in CUES))
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir() / "planted"
    started = time.perf_counter()
    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=2, include_dashboard=False, log_to_driver=False)
    lines = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.keep) if args.keep else Path(scratch)
        for cue in wanted:
            for model, split in CASES:
                result = run_case(cue, model, split, root, cache, args.samples)
                lines.append(result.row())
                print(result.row(), file=sys.stderr, flush=True)
    table = "\n".join([HEADER, *lines])
    print(table)
    body = (
        f"## Audit benchmark family\n\n{machine_line(torch.device('cpu'), torch.get_num_threads())}; load {load_average()}; "
        f"`{command_line('bench.audit_family')}`, {time.perf_counter() - started:.0f} s with training.\n\n{table}\n"
    )
    write_section(Path(args.report), "## Audit benchmark family", body)


if __name__ == "__main__":
    main()
