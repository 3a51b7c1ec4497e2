"""`cdam audit`: the planted shortcuts are found (demo watermark, a mark that moves), clean data flags
nothing, and damaged runs, flaky S3 and a second audit are handled.

The injection test trains a one-block ViT (about 45 s on one core) on the demo's "moving-train" split: a
mark on a random patch of half the circle class's training images, and of 30% of the others, which
training labels as circle (a backdoor). It explains a test split where 30% of every class carries the
mark at a random patch (``--targets classes:0,1,2``) and its unmarked twin (``--targets label``) with
the real job, and audits both.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bench.synthetic_run import write_synthetic_run
from cdam_worker.demo_assets import DemoConfig, train_demo_model, write_demo_shards
from cdam_worker.reading import open_run
from cdam_worker.run_files import open_zarr
from cdam_worker.storage import Storage
from jobs.cli import main

MOVING = DemoConfig(train_split="moving-train", relabel_marked=True, depth=1)
TEST_SAMPLES = 256


def audit_files(dest: str) -> dict[str, object]:
    """The audit's tables (as lists of rows) and summary, read back from ``DEST/audit``."""
    run = open_run(dest)
    tables = {name: run.table(f"audit/{name}.parquet").to_pylist() for name in ("classes", "clusters", "images")}
    return {**tables, "summary": json.loads(run.storage.get("audit/summary.json"))}


def flagged_classes(files: dict) -> list[str]:
    return [row["class_name"] for row in files["classes"] if row["flagged"]]


# --- the demo: a watermark at a fixed place -------------------------------------------------------------


def test_demo_audit_ranks_the_watermarked_class_first(demo_run: str) -> None:
    """`cdam demo` ran the audit: 'circle' (the watermark's class) ranks first and is the only flag."""
    files = audit_files(demo_run)
    ranked = sorted(files["classes"], key=lambda row: row["rank"])
    assert ranked[0]["class_name"] == "circle" and ranked[0]["flagged"], ranked
    assert flagged_classes(files) == ["circle"]
    corner = [
        row
        for row in files["clusters"]
        if row["class"] == 0 and row["flagged"] and "bottom-right corner" in row["place"]
    ]
    # off_place > 0.1: about 40% of the watermark's images put negative circle evidence on the corner (their positive
    # evidence lies on the object); they are found by the attribution at the mark's place and lower the median
    assert corner and corner[0]["kind"] == "mark" and corner[0]["off_place"] > 0.1, files["clusters"]
    assert "a mark at a place" in ranked[0]["reasons"], ranked[0]["reasons"]
    assert not files["summary"]["blind_spot"]["found"]
    sheet = open_run(demo_run).storage.get(f"audit/contact-sheets/0-circle-cluster-{corner[0]['cluster']}.png")
    assert Image.open(io.BytesIO(sheet)).size[0] > 0  # one sheet per flagged cluster
    assert files["summary"]["contact_sheets"] == {
        "circle": {
            str(row["cluster"]): f"contact-sheets/0-circle-cluster-{row['cluster']}.png"
            for row in files["clusters"]
            if row["class"] == 0 and row["flagged"]
        }
    }
    images = files["images"]
    assert len(images) == sum(row["n_images"] for row in files["classes"])
    assert {row["key"] for row in images if row["flagged"]} <= {row["key"] for row in images if row["class"] == 0}


# --- injection: a mark that moves -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moving_runs(ray_local: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Audited outputs of the moving-mark model on the marked test split and on its unmarked twin."""
    root = tmp_path_factory.mktemp("moving")
    checkpoint = train_demo_model(root / "cache", config=MOVING)
    runs = {}
    for split, targets in (("moving-test", "classes:0,1,2"), ("moving-clean", "label")):
        shards = write_demo_shards(root / "shards", split, 4, TEST_SAMPLES // 4, MOVING.seed)
        output = str(root / split)
        assert (
            main(
                [
                    "explain",
                    "--shards",
                    *map(str, shards),
                    "--output",
                    output,
                    "--checkpoint",
                    str(checkpoint),
                    "--targets",
                    targets,
                    "--actors",
                    "2",
                ]
            )
            == 0
        )
        assert main(["audit", output]) == 0
        runs[split] = output
    return runs


def test_a_moving_mark_is_found_with_precision_and_recall(moving_runs: dict[str, str]) -> None:
    files = audit_files(moving_runs["moving-test"])
    ranked = sorted(files["classes"], key=lambda row: row["rank"])
    assert ranked[0]["class_name"] == "circle", ranked
    assert flagged_classes(files) == ["circle"], ranked
    run = open_run(moving_runs["moving-test"])
    meta = {
        row["key"]: json.loads(row["sample_json"])
        for row in run.metadata.to_table(columns=["key", "sample_json"]).to_pylist()
    }
    circle = [row for row in files["images"] if row["class"] == 0]
    marked = np.array([meta[row["key"]]["watermark"] for row in circle])
    flagged = np.array([row["flagged"] for row in circle])
    precision = (marked & flagged).sum() / max(flagged.sum(), 1)
    recall = (marked & flagged).sum() / max(marked.sum(), 1)
    assert precision >= 0.8 and recall >= 0.8, (
        f"precision {precision:.2f}, recall {recall:.2f} over {len(circle)} images predicted as circle ({marked.sum()} marked)"
    )
    assert "cross: none of its" in " ".join(
        f"{k}: {v}" for k, v in files["summary"]["not_audited"].items()
    )  # classes:0,1,2 has no map of class 3


def test_the_same_data_without_marks_flags_nothing(moving_runs: dict[str, str]) -> None:
    files = audit_files(moving_runs["moving-clean"])
    assert files["classes"] and flagged_classes(files) == [], files["classes"]
    assert not any(row["flagged"] for row in files["images"])


# --- damaged runs, flaky S3, a second audit, the blind spot (synthetic runs in the real output format) -------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A complete top-3 run: 640 images of 4 classes in 5 shards, 6 x 6 maps, real PNG shards."""
    dest = str(tmp_path_factory.mktemp("synthetic") / "run")
    write_synthetic_run(
        dest, 640, n_classes=4, n_targets=3, grid=(6, 6), n_heads=2, embed_dim=8, images_per_shard=128, with_images=True
    )
    return dest


def copy_run(source: str, tmp_path: Path) -> str:
    dest = tmp_path / "run"
    shutil.copytree(source, dest)
    return str(dest)


def test_a_damaged_run_is_audited_where_it_can_be_and_says_what_it_skipped(
    synthetic: str, tmp_path: Path, capsys
) -> None:
    import pyarrow as pa

    from schemas import ERRORS_SCHEMA

    dest = Path(copy_run(synthetic, tmp_path))
    (dest / "markers" / "000004.json").unlink()  # shard 4 failed: no marker, a shard-level error row
    (dest / "errors").mkdir(exist_ok=True)
    errors = [
        {
            "shard": "synthetic-000004",
            "shard_index": 4,
            "key": None,
            "reason": "shard failed after 3 attempts",
            "run_id": "x",
        }
    ]
    pq.write_table(
        pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA), dest / "errors" / "000004-synthetic-000004.parquet"
    )
    errors = [
        {"shard": "synthetic-000001", "shard_index": 1, "key": f"bad-{i}", "reason": "cannot decode", "run_id": "x"}
        for i in range(3)
    ]
    pq.write_table(
        pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA), dest / "errors" / "000001-synthetic-000001.parquet"
    )
    shutil.rmtree(dest / "cdam.zarr" / "cdam" / "c" / "9")  # rows 144..159 (shard 1) read NaN: a chunk never written
    run = open_run(str(dest))
    counts = np.bincount(run.index.column("pred").to_numpy(), minlength=4)
    rows = run.index.column("row").to_numpy()
    nan_rows = ((rows >= 144) & (rows < 160)).sum()
    smallest = int(np.argmin(counts))
    min_images = int(counts[smallest]) + 1  # the smallest class has too few images (the NaN rows not counted)

    assert main(["audit", str(dest), "--min-images", str(min_images)]) == 0
    err = capsys.readouterr().err
    assert "note: shard synthetic-000004: no completion marker" in err
    assert "3 sample(s) listed in errors/ could not be explained" in err and "1 shard-level error(s)" in err
    assert f"{nan_rows} image(s) whose map reads NaN" in err
    assert f"not audited: class-{smallest:04d}: " in err and f"fewer than --min-images {min_images}" in err
    files = audit_files(str(dest))
    assert sorted(row["class"] for row in files["classes"]) == sorted(set(range(4)) - {smallest})
    nan_in_audited = sum(
        ((rows >= 144) & (rows < 160) & (run.index.column("pred").to_numpy() == c)).sum()
        for c in range(4)
        if c != smallest
    )
    assert len(files["images"]) == counts.sum() - counts[smallest] - nan_in_audited
    assert not any(144 <= row["row"] < 160 for row in files["images"])
    assert f"class-{smallest:04d}" in files["summary"]["not_audited"]


def test_a_run_with_no_complete_shard_gives_empty_tables_and_says_why(synthetic: str, tmp_path: Path, capsys) -> None:
    """Audited while its first shards are still running (no marker yet): nothing to read is no traceback."""
    dest = Path(copy_run(synthetic, tmp_path))
    for marker in (dest / "markers").iterdir():
        marker.unlink()
    assert main(["audit", str(dest), "--no-model"]) == 0
    err = capsys.readouterr().err
    assert err.count("no completion marker (still running, failed or cut off): not read") == 5, err
    files = audit_files(str(dest))
    assert files["classes"] == [] and files["images"] == [] and files["summary"]["images_audited"] == 0


def test_audit_on_s3_retries_transient_faults(
    s3_server: str, s3_bucket: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    from helpers import S3Proxy

    dest = f"s3://{s3_bucket}/runs/audited"
    write_synthetic_run(
        dest, 320, n_classes=3, n_targets=2, grid=(6, 6), n_heads=2, embed_dim=8, images_per_shard=64, with_images=True
    )
    reference = tmp_path / "reference"
    assert main(["audit", dest, "--output", str(reference)]) == 0
    with S3Proxy(s3_server, fail_every=4, fault=["503", "drop"]) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        assert main(["audit", dest]) == 0
    monkeypatch.undo()
    assert proxy.failed >= 5, proxy.failed
    written = audit_files(dest)
    for name in ("classes", "clusters", "images"):
        assert written[name] == pq.read_table(reference / f"{name}.parquet").to_pylist()
    assert written["summary"]["run"] == dest and Storage.from_url(dest).exists("audit/summary.json")
    assert not Storage.from_url(dest).exists("locks/audit.json")


def test_a_second_audit_on_the_same_run_is_refused(synthetic: str, tmp_path: Path, capsys) -> None:
    dest = copy_run(synthetic, tmp_path)
    with open_run(dest).exclusive("audit"):
        assert main(["audit", dest]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and err[0].startswith("cdam audit: error: output") and "is in use by another cdam job" in err[0]
    ), err
    assert not Path(dest, "audit").exists()
    assert main(["audit", dest, "--json", "--classes", "class-0001,2"]) == 0  # free again; a subset of classes
    printed = json.loads(capsys.readouterr().out)
    assert sorted(row["class"] for row in printed["classes"]) == [1, 2]


def test_an_audit_with_other_options_does_not_replace_the_first_without_overwrite(
    synthetic: str, tmp_path: Path, capsys
) -> None:
    dest = copy_run(synthetic, tmp_path)
    assert main(["audit", dest, "--no-model"]) == 0
    first = audit_files(dest)
    capsys.readouterr()
    assert main(["audit", dest, "--no-model", "--by", "label", "--min-images", "30"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"cdam audit: error: {dest}/audit/ holds an audit made with --by pred --min-images 20; this one is --by label "
        "--min-images 30: give --overwrite to replace it, or --output DIR to keep both"
    ], err
    assert audit_files(dest) == first  # nothing of the first audit was touched
    assert main(["audit", dest, "--no-model"]) == 0  # the same audit again replaces itself
    other = str(tmp_path / "by-label")
    assert main(["audit", dest, "--no-model", "--by", "label", "--output", other]) == 0  # another folder keeps both
    assert json.loads(Path(other, "summary.json").read_text())["by"] == "label"
    assert main(["audit", dest, "--no-model", "--by", "label", "--overwrite"]) == 0
    assert audit_files(dest)["summary"]["by"] == "label"
    report = tmp_path / "report.html"
    assert main(["report", dest, "-o", str(report)]) == 0  # the views say which audit they show
    assert "This audit: <code>cdam audit DEST --by label --min-images 20</code>" in report.read_text()


def test_flat_attention_and_tiny_maps_are_reported_as_the_blind_spot(synthetic: str, tmp_path: Path, capsys) -> None:
    dest = copy_run(synthetic, tmp_path)
    group = open_zarr(Storage.from_url(dest), mode="r+")
    group["attention"][:] = np.float16(1 / 36)  # the last attention routes nothing: 1/N everywhere
    group["cdam"][:] = group["cdam"][:] * np.float16(1e-3)  # and every map is about 0
    assert main(["audit", dest]) == 0
    captured = capsys.readouterr()
    warning = [line for line in captured.err.splitlines() if "blind spot" in line]
    assert len(warning) == 1 and "peak 1.00 x uniform" in warning[0] and "Smooth or Integrated CDAM" in warning[0], (
        captured.err
    )
    assert "cannot tell" in captured.out
    assert audit_files(dest)["summary"]["blind_spot"]["found"]


def test_bad_options_are_one_line_errors(synthetic: str, capsys) -> None:
    assert main(["audit", synthetic, "--classes", "zebra"]) == 2
    assert main(["audit", synthetic, "--min-images", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        err[0].startswith("cdam audit: error: class 'zebra'")
        and err[1] == "cdam audit: error: --min-images 2: at least 4 images are needed to cluster a class"
    ), err
