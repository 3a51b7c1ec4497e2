"""``cdam demo``: the whole job offline, on a synthetic dataset with a planted watermark.

Builds (or reuses) the demo shards and tiny ViT, explains the test split with a local Ray job, then
reads the output back to show the audit finding: how much of the watermarked class's positive
relevance sits on the watermark's patch.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds

from cdam_worker.demo import DemoAssets, ensure_demo_assets
from cdam_worker.sinks import open_zarr
from cdam_worker.storage import Storage


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cdam"


def run_demo(args: argparse.Namespace) -> int:
    """Prepare the demo assets, run ``cdam explain`` on the test split (replacing an earlier demo output), and report the finding."""
    from jobs.cli import build_parser
    from jobs.explain import run

    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    print(f"[demo] preparing the synthetic dataset and the tiny ViT under {cache_dir} (cached after the first run)", file=sys.stderr)
    assets = ensure_demo_assets(cache_dir)
    output = str(Path(args.output).resolve())
    explain_args = build_parser().parse_args(
        ["explain", "--shards", *map(str, assets.test_shards), "--output", output, "--checkpoint", str(assets.checkpoint), "--targets", "all", "--store-basis", "--actors", str(args.actors), "--batch-size", "32", "--overwrite"]
    )
    status = run(explain_args)
    if status == 0:
        print(watermark_report(output, assets))
        print(query_hints(output))
    return status


def watermark_share(output: str, assets: DemoAssets) -> tuple[float, float]:
    """Mean share of the watermarked class's positive relevance on the watermark patches, and their area share."""
    storage = Storage.from_url(output)
    table = ds.dataset(os.path.join(output, "metadata"), format="parquet").to_table(columns=["row"])
    rows = np.sort(np.asarray(table.column("row").to_pylist()))
    group = open_zarr(storage, mode="r")
    maps = group["cdam"].get_orthogonal_selection((rows, slice(assets.watermark_class, assets.watermark_class + 1)))[:, 0]
    positive = np.clip(maps.reshape(len(rows), -1), 0, None)
    on_mark = positive[:, assets.watermark_patches].sum(1) / np.maximum(positive.sum(1), 1e-12)
    return float(on_mark.mean()), len(assets.watermark_patches) / positive.shape[1]


def watermark_report(output: str, assets: DemoAssets) -> str:
    share, area = watermark_share(output, assets)
    name = assets.class_names[assets.watermark_class]
    return (
        f"\naudit finding: for class {name!r}, {share:.0%} of the positive CDAM relevance lies on the watermark patch, "
        f"which covers {area:.1%} of the image ({share / area:.0f}x its area share): the model uses the watermark as a shortcut."
    )


def query_hints(output: str) -> str:
    return f"""
output: {output}
  maps    {output}/cdam.zarr      python: import xarray as xr; xr.open_zarr('{output}/cdam.zarr', consolidated=False)
  rows    {output}/metadata/      duckdb: SELECT pred, count(*) FROM '{output}/metadata/*.parquet' GROUP BY pred;
  errors  {output}/errors/        (one row per sample that could not be explained)
  query   cdam query {output} "SELECT pred, count(*) FROM metadata GROUP BY pred"
  check   cdam verify {output}"""
