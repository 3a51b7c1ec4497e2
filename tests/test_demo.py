"""`cdam demo`, the README's first command: the whole job offline, and maps that find the planted watermark."""

from __future__ import annotations

import duckdb
import pytest

from jobs.cli import main
from jobs.demo import watermark_share
from jobs.verify import verify_output


@pytest.fixture
def fresh_ray():
    """The demo's driver starts its own local Ray; shut it down so later modules start theirs."""
    import ray

    yield
    ray.shutdown()


def test_demo_runs_offline_and_its_maps_find_the_watermark(demo_cache, demo_assets, tmp_path, fresh_ray, capsys):
    output = tmp_path / "demo-output"
    assert main(["demo", "--output", str(output), "--cache-dir", str(demo_cache)]) == 0
    printed = capsys.readouterr().out
    assert "256 images explained, 0 samples in errors/" in printed
    assert "audit finding: for class 'circle'" in printed and f"cdam verify {output}" in printed
    assert verify_output(str(output)) == []

    share, area = watermark_share(str(output), demo_assets)
    assert share >= 3 * area, f"the watermarked class puts {share:.3f} of its positive relevance on {area:.3f} of the area"

    rows = duckdb.sql(f"SELECT count(*), count(DISTINCT key), min(len(targets)) FROM '{output}/metadata/*.parquet'").fetchall()[0]
    assert rows == (256, 256, 4)
