"""`cdam demo`, the README's first command: the whole job offline, and an audit that finds the planted watermark."""

from __future__ import annotations

import duckdb
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from jobs.verify import verify_output


@pytest.fixture
def fresh_ray():
    """The demo's driver starts its own local Ray; shut it down so later modules start theirs."""
    import ray

    yield
    ray.shutdown()


def test_demo_runs_offline_and_its_audit_finds_the_watermark(demo_cache, tmp_path, fresh_ray, capfd):
    output = tmp_path / "demo-output"
    assert main(["demo", "--output", str(output), "--cache-dir", str(demo_cache)]) == 0
    captured = capfd.readouterr()
    printed = captured.out
    assert (
        "Token authentication" not in captured.err
    )  # the local Ray keeps its token; its notice is not the user's business
    assert (
        "errors  none" in printed and f"{output}/errors/" not in printed
    )  # no errors/ folder is named when there is none
    assert "256 images explained, 0 samples in errors/" in printed
    assert f"cdam verify {output}" in printed
    assert verify_output(str(output)) == []

    top = pq.read_table(output / "audit" / "classes.parquet").sort_by("rank").to_pylist()[0]  # what the demo printed
    assert top["class_name"] == "circle" and top["flagged"]
    assert "audit finding: class 'circle' ranks first of" in printed and top["reasons"] in printed

    rows = duckdb.sql(
        f"SELECT count(*), count(DISTINCT key), min(len(targets)) FROM '{output}/metadata/*.parquet'"
    ).fetchall()[0]
    assert rows == (256, 256, 4)
