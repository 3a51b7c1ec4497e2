"""The reading side: ``open_run`` over the output contract, and ``cdam query`` (local folder and moto S3)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from bench.synthetic_run import write_synthetic_run
from cdam_worker import RunError, open_run
from cdam_worker.shards.samples import Sample
from cdam_worker.shards.tar_reader import iter_samples
from cdam_worker.storage import Storage
from jobs.cli import main

N_IMAGES = 40
PER_SHARD = 16


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[str, dict]:
    """A complete top-3 run of 40 images in 3 shards (16, 16, 8), with real PNG shards."""
    dest = str(tmp_path_factory.mktemp("synthetic") / "run")
    truth = write_synthetic_run(
        dest,
        N_IMAGES,
        n_classes=7,
        n_targets=3,
        grid=(4, 5),
        n_heads=2,
        embed_dim=8,
        images_per_shard=PER_SHARD,
        with_images=True,
    )
    return dest, truth


def test_open_run_reads_metadata_maps_and_images_of_the_demo(demo_run: str) -> None:
    run = open_run(demo_run)
    assert run.complete and run.skipped == []
    assert run.class_names == ["circle", "square", "triangle", "cross"] and run.grid == (8, 8) and run.has_basis
    assert run.metadata.count_rows() == 256 and run.errors.num_rows == 0
    rows = run.index.column("row").to_numpy()
    assert np.all(np.diff(rows) > 0)

    keys = run.index.column("key").to_pylist()[::37]
    maps = run.maps_for(keys, ["square", 0])
    stored = run.group["cdam"][:]
    for i, row in enumerate(run.rows_of(keys)):
        np.testing.assert_array_equal(maps[i, 0], stored[row, 1])  # --targets all: slot k is class k
        np.testing.assert_array_equal(maps[i, 1], stored[row, 0])
    assert run.maps["cdam"].dims == ("image", "target", "y", "x")

    key = keys[1]
    shard = next(
        s
        for s in run.shards
        if s.name == run.index.column("shard")[run.index.column("key").to_pylist().index(key)].as_py()
    )
    expected = next(item for _, item in iter_samples(shard.url) if isinstance(item, Sample) and item.key == key)
    assert np.array_equal(np.asarray(run.image(key)), np.asarray(expected.image))


def test_the_job_records_where_each_file_lies_and_images_are_read_without_a_scan(
    demo_run: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job writes members/<shard>.parquet as it streams each shard: exactly what a scan of the tar
    headers finds, every explained key in it. Run.image reads a sample from it with no scan; a run without
    it (made before it existed) scans the headers and shows the same pixels."""
    import cdam_worker.reading.run as run_module
    from cdam_worker.shards.member_index import member_offsets
    from schemas.paths import shard_file_stem

    run = open_run(demo_run)
    for shard in run.shards:
        table = pq.read_table(Path(demo_run) / "members" / f"{shard_file_stem(shard.index, shard.name)}.parquet")
        recorded: dict[str, list] = {}
        for key, member, offset, size in zip(
            *(table.column(name).to_pylist() for name in ("key", "member", "offset", "size"))
        ):
            recorded.setdefault(key, []).append((member, offset, size))
        assert recorded == member_offsets(shard.url)
    assert set(run.index.column("key").to_pylist()) <= {
        key for shard in run.shards for key in run._member_offsets(shard)
    }

    keys = run.index.column("key").to_pylist()[::7]
    scans: list[str] = []
    monkeypatch.setattr(run_module, "member_offsets", lambda url: scans.append(url) or member_offsets(url))
    with_table = [np.asarray(open_run(demo_run).image(key)) for key in keys]
    assert scans == []
    copy = tmp_path / "old-run"
    shutil.copytree(demo_run, copy)
    shutil.rmtree(copy / "members")
    old = open_run(str(copy))
    scanned = [np.asarray(old.image(key)) for key in keys]
    assert len(scans) == len({old._shard_of(key).url for key in keys}) > 0
    assert all(np.array_equal(a, b) for a, b in zip(with_table, scanned))
    from jobs.verify import verify_output

    assert verify_output(demo_run) == []
    assert any(
        problem.endswith(".parquet is missing") and "members/" in problem for problem in verify_output(str(copy))
    )  # its markers list the tables


def test_maps_for_is_nan_where_the_class_was_not_a_target(synthetic) -> None:
    dest, truth = synthetic
    run = open_run(dest)
    keys = truth["keys"][:10].tolist()
    targets = np.asarray(run.index.column("targets").to_pylist()[:10])
    maps = run.maps_for(keys, list(range(7)))
    is_target = (targets[:, :, None] == np.arange(7)).any(axis=1)
    assert np.isnan(maps[~is_target]).all()
    assert not np.isnan(maps[is_target]).any()
    stored = run.read_rows("cdam", run.rows_of(keys))
    slot = np.argmax(targets == truth["pred"][:10, None], axis=1)
    np.testing.assert_array_equal(
        maps[np.arange(10), truth["pred"][:10]], stored[np.arange(10), slot].astype(np.float32)
    )
    with pytest.raises(RunError, match="key 'nope' is not an explained image"):
        run.maps_for(["nope"], [0])
    with pytest.raises(RunError, match="class 'zebra'"):
        run.maps_for(keys, ["zebra"])


def test_opening_and_querying_never_read_maps(synthetic, tmp_path: Path) -> None:
    dest = tmp_path / "run"
    shutil.copytree(synthetic[0], dest)
    for array in ("cdam", "attention", "logits", "embedding", "target_class"):
        shutil.rmtree(dest / "cdam.zarr" / array / "c")  # every chunk object gone: metadata must not need them
    run = open_run(str(dest))
    assert run.metadata.count_rows() == N_IMAGES
    assert run.sql().execute("SELECT count(*) FROM targets").fetchone()[0] == N_IMAGES * 3


def test_a_partial_run_reads_only_shards_with_a_marker(synthetic, tmp_path: Path) -> None:
    dest = tmp_path / "run"
    shutil.copytree(synthetic[0], dest)
    (dest / "markers" / "000001.json").unlink()  # shard 1 still running (or cut off): its files must not be read
    run = open_run(str(dest))
    assert run.skipped == ["shard synthetic-000001: no completion marker (still running, failed or cut off): not read"]
    assert run.metadata.count_rows() == N_IMAGES - PER_SHARD
    assert set(run.index.column("shard").to_pylist()) == {"synthetic-000000", "synthetic-000002"}


def test_cdam_query_prints_and_writes_tables(synthetic, tmp_path: Path, capsys) -> None:
    dest, truth = synthetic
    assert main(["query", dest, "SELECT count(*) AS n, count(DISTINCT key) AS k FROM metadata"]) == 0
    assert "40" in capsys.readouterr().out
    out_csv = tmp_path / "targets.csv"
    assert (
        main(["query", dest, "SELECT key, slot, class, pos_sum FROM targets ORDER BY key, slot", "--csv", str(out_csv)])
        == 0
    )
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == N_IMAGES * 3 and rows[0]["key"] == truth["keys"][0] and rows[0]["slot"] == "0"
    assert int(rows[0]["class"]) == truth["pred"][0]
    out_parquet = tmp_path / "errors.parquet"
    assert main(["query", dest, "SELECT * FROM errors", "--parquet", str(out_parquet)]) == 0
    assert pq.read_table(out_parquet).num_rows == 0


def test_cdam_query_errors_are_one_line(synthetic, tmp_path: Path, capsys) -> None:
    assert main(["query", synthetic[0], "SELECT nope FROM metadata"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cdam query: error: SQL:") and "nope" in err[0]
    assert main(["query", str(tmp_path), "SELECT 1"]) == 2
    assert "no manifest.json, so no cdam run" in capsys.readouterr().err


def test_open_run_on_s3(s3_bucket: str) -> None:
    dest = f"s3://{s3_bucket}/runs/one"
    truth = write_synthetic_run(
        dest, 20, n_classes=5, n_targets=2, grid=(3, 3), n_heads=2, embed_dim=4, images_per_shard=16, with_images=True
    )
    run = open_run(dest)
    assert run.complete and run.metadata.count_rows() == 20
    key = truth["keys"][17]
    assert run.image(key).size == (12, 12)
    maps = run.maps_for([key], [int(truth["pred"][17])])
    stored = run.read_rows("cdam", run.rows_of([key]))[0, 0]
    np.testing.assert_array_equal(maps[0, 0], stored.astype(np.float32))
    assert run.sql().execute("SELECT count(*) FROM targets").fetchone()[0] == 40
    assert Storage.from_url(dest).exists("manifest.json")


def test_cdam_query_on_a_run_with_a_failed_shard_says_what_it_skipped(synthetic, tmp_path: Path, capsys) -> None:
    import pyarrow as pa

    from schemas import ERRORS_SCHEMA

    dest = tmp_path / "run"
    shutil.copytree(synthetic[0], dest)
    (dest / "markers" / "000001.json").unlink()  # shard 1 failed: no marker, one shard-level error row
    failure = [
        {
            "shard": "synthetic-000001",
            "shard_index": 1,
            "key": None,
            "reason": "shard failed after 3 attempts: actor died",
            "run_id": "x",
        }
    ]
    (dest / "errors").mkdir(exist_ok=True)
    pq.write_table(
        pa.Table.from_pylist(failure, schema=ERRORS_SCHEMA), dest / "errors" / "000001-synthetic-000001.parquet"
    )
    out_csv = tmp_path / "errors.csv"
    assert main(["query", str(dest), "SELECT shard, key, reason FROM errors", "--csv", str(out_csv)]) == 0
    assert "note: shard synthetic-000001: no completion marker" in capsys.readouterr().err
    rows = list(csv.DictReader(out_csv.open()))
    assert rows == [{"shard": "synthetic-000001", "key": "", "reason": "shard failed after 3 attempts: actor died"}]
    assert main(["query", str(dest), "SELECT count(*) FROM metadata", "--csv", str(out_csv)]) == 0
    assert out_csv.read_text().splitlines()[1] == str(N_IMAGES - PER_SHARD)


def test_cdam_query_on_s3_retries_transient_faults(s3_server: str, s3_bucket: str, tmp_path: Path, monkeypatch) -> None:
    from helpers import S3Proxy

    dest = f"s3://{s3_bucket}/runs/flaky"
    write_synthetic_run(dest, 20, n_classes=5, n_targets=2, grid=(3, 3), n_heads=2, embed_dim=4, images_per_shard=16)
    out_csv = tmp_path / "n.csv"
    with S3Proxy(s3_server, fail_every=3, fault=["503", "drop"]) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        assert (
            main(["query", dest, "SELECT count(*) AS n, sum(len(targets)) AS t FROM metadata", "--csv", str(out_csv)])
            == 0
        )
        maps = open_run(dest).maps_for([f"synthetic-000001/{3:06d}"], [0, 1, 2, 3, 4])
    assert proxy.failed >= 3
    assert out_csv.read_text().splitlines()[1] == "20,40"
    assert np.isfinite(maps).sum() == 2 * 9
