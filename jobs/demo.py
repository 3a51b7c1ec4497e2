"""``cdam demo``: the whole job offline, on a synthetic dataset with a planted watermark.

Builds (or reuses) the demo shards and tiny ViT, explains the test split with a local Ray job, runs
``cdam audit`` on the output and prints its finding, read back from ``audit/classes.parquet``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from jobs.audit import audit


def add_parser(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser(
        "demo",
        help="run the whole job offline on a built-in synthetic dataset with a planted watermark",
        description="Generate a synthetic WebDataset with a spurious watermark, train a tiny ViT (cached), explain the test split with a local Ray job, audit it (cdam audit), and show how to query the output.",
    )
    demo.add_argument("--output", default="cdam-demo-output", help="output folder (default: ./cdam-demo-output)")
    demo.add_argument(
        "--cache-dir", default=None, help="where the demo data and model are cached (default: ~/.cache/cdam)"
    )
    demo.add_argument("--actors", type=int, default=2, help="actors (default: 2)")
    demo.set_defaults(handler=run_demo)


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cdam"


def run_demo(args: argparse.Namespace) -> int:
    """Prepare the demo assets, run the explain job on the test split (replacing an earlier demo output),
    audit it, and report the finding."""
    from cdam_worker.demo_assets import ensure_demo_assets
    from cdam_worker.pipeline.driver import explain
    from cdam_worker.pipeline.plan import ExplainOptions
    from schemas.manifest import ModelSpec

    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    print(
        f"[demo] preparing the synthetic dataset and the tiny ViT under {cache_dir} (cached after the first run)",
        file=sys.stderr,
    )
    assets = ensure_demo_assets(cache_dir)
    output = str(Path(args.output).resolve())
    model = ModelSpec(None, checkpoint=str(Path(assets.checkpoint).resolve()))
    options = ExplainOptions(
        shards=tuple(map(str, assets.test_shards)),
        output=output,
        model=model,
        targets="all",
        store_basis=True,
        actors=args.actors,
        batch_size=32,
        overwrite=True,
    )
    status = explain(options)
    if status != 0:
        return status
    print(f"\n[demo] auditing {output}", file=sys.stderr)
    status = audit(output)
    if status == 0:
        print(audit_finding(output))
        print(query_hints(output))
    return status


def audit_finding(output: str) -> str:
    """The audit's most suspicious class, as ``audit/classes.parquet`` records it."""
    from cdam_worker.reading import open_run

    classes = sorted(open_run(output).table("audit/classes.parquet").to_pylist(), key=lambda row: row["rank"])
    if not classes:
        return "\naudit finding: no class had enough images to audit."
    top = classes[0]
    verdict = "flagged as a likely shortcut" if top["flagged"] else "not flagged"
    return f"\naudit finding: class {top['class_name']!r} ranks first of {len(classes)} (score {top['score']:.2f}, {verdict}): {top['reasons']}."


def query_hints(output: str) -> str:
    """Where the demo's outputs are and how to read them; ``errors/`` only when a sample went there."""
    from cdam_worker.reading import open_run

    failed = open_run(output).errors.num_rows
    errors = (
        f"{output}/errors/        ({failed} sample(s) that could not be explained)"
        if failed
        else "none           (every sample was explained: no errors/ folder)"
    )
    return f"""
output: {output}
  maps    {output}/cdam.zarr      python: import xarray as xr; xr.open_zarr('{output}/cdam.zarr', consolidated=False)
  rows    {output}/metadata/      duckdb: SELECT pred, count(*) FROM '{output}/metadata/*.parquet' GROUP BY pred;
  errors  {errors}
  query   cdam query {output} "SELECT pred, count(*) FROM metadata GROUP BY pred"
  audit   {output}/audit/         classes.parquet, clusters.parquet, images.parquet, contact-sheets/
  check   cdam verify {output}"""
