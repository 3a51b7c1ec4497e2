"""One bad sample costs one sample (issue 12): values that cannot be stored are refused where a sample is
read, a row that still cannot be written becomes that sample's error, and the job's summary and ``cdam
verify`` check that every sample is explained or in errors/. Regression tests for what the fuzz tests found."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from accounting import assert_every_sample_accounted, in_process_processor, process, write_checkpoint
from cdam_worker.pipeline.driver import print_summary
from cdam_worker.pipeline.phases import PhaseClock
from cdam_worker.pipeline.settings import ShardTask
from cdam_worker.pipeline.sinks import ExplainedRow, ShardWriter
from cdam_worker.shards.samples import Sample, SampleError
from cdam_worker.shards.tar_reader import ShardScan, iter_samples, scan_shard
from cdam_worker.storage import Storage
from helpers import image_bytes, make_shard, png_bytes
from jobs.cli import main
from jobs.verify import verify_output
from schemas import array_specs
from schemas.manifest import ShardSummary


def photo(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 30, 3), dtype=np.uint8)
    return image_bytes(Image.fromarray(pixels), "JPEG", quality=90)


def read_table(output: str, path: str) -> list[dict]:
    return pq.read_table(io.BytesIO(Storage.from_url(output).get(path))).to_pylist()


# --- the reported case, through the real job ------------------------------------------------------------


def test_label_one_past_int32_costs_one_sample_not_the_shard(ray_local, tmp_path, capsys):
    samples = [
        (f"photo{i}", {"jpg": photo(i), "cls": b"2147483648" if i == 5 else str(i % 6).encode()}) for i in range(8)
    ]
    shard = make_shard(tmp_path / "photos-0000.tar", samples)
    output = str(tmp_path / "out")
    argv = [
        "explain",
        "--shards",
        str(shard),
        "--output",
        output,
        "--checkpoint",
        write_checkpoint(tmp_path / "model.pt"),
        "--targets",
        "topk:1",
        "--actors",
        "1",
        "--batch-size",
        "4",
    ]

    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "done: 7 images explained, 1 samples in errors/, 1/1 shards complete" in captured.out
    assert "retrying" not in captured.err
    assert "explaining: 100%" in captured.err and "8/8" in captured.err  # the sample in errors/ counts as done
    metadata = read_table(output, "metadata/000000-photos-0000.parquet")
    assert sorted(row["key"] for row in metadata) == [f"photo{i}" for i in range(8) if i != 5]
    errors = read_table(output, "errors/000000-photos-0000.parquet")
    assert [(row["key"], row["reason"]) for row in errors] == [
        ("photo5", "cls label 2147483648 in 'photo5.cls' does not fit the int32 label column (-2147483648..2147483647)")
    ]
    assert verify_output(output) == []
    assert main(["verify", output]) == 0
    assert "OK: 0 problem(s)" in capsys.readouterr().out

    # verify checks the accounting: a marker claiming the error row is about the shard leaves a sample unaccounted
    marker = Path(output) / "markers/000000.json"
    marker.write_text(marker.read_text().replace('"n_shard_errors": 0', '"n_shard_errors": 1'))
    assert verify_output(output) == [
        "shard photos-0000: errors has 0 shard-level rows, marker says 1",
        "shard photos-0000: 8 samples planned, but 7 explained + 0 in errors/ (each sample must be explained or in errors/, exactly once)",
    ]


# --- values refused where the sample is read ------------------------------------------------------------


def read_back(path: Path) -> dict[str, Sample | SampleError]:
    return {item.key: item for _, item in iter_samples(str(path))}


@pytest.mark.parametrize(
    ("text", "label"),
    [
        (b"2147483647", 2147483647),
        (b"-2147483648", -2147483648),
        (b" +0007\n", 7),
        (b"-0", 0),
    ],
)
def test_labels_at_the_int32_bounds_are_kept(tmp_path, text, label):
    sample = read_back(make_shard(tmp_path / "s.tar", [("a", {"png": png_bytes(), "cls": text})]))["a"]
    assert isinstance(sample, Sample) and sample.label == label


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (
            b"2147483648",
            "cls label 2147483648 in 'a.cls' does not fit the int32 label column (-2147483648..2147483647)",
        ),
        (
            b"-2147483649",
            "cls label -2147483649 in 'a.cls' does not fit the int32 label column (-2147483648..2147483647)",
        ),
        (
            b"99999999999999999999",
            "cls label 99999999999999999999 in 'a.cls' does not fit the int32 label column (-2147483648..2147483647)",
        ),
        # more than the 4300 digits int() accepts: used to raise out of the reader and lose the rest of the shard
        (
            b"7" * 5000,
            "cls label 77777777777777777777... (5000 digits) in 'a.cls' does not fit the int32 label column (-2147483648..2147483647)",
        ),
        (b"0x10", "non-integer cls 'a.cls': '0x10'"),
        ("\u0663".encode(), "non-integer cls 'a.cls': '\u0663'"),  # an Arabic-Indic digit: int() would take it
        (b"\xff\xfe7", "non-integer cls 'a.cls': '\ufffd\ufffd7'"),
    ],
)
def test_labels_that_cannot_be_stored_are_that_samples_error(tmp_path, text, reason):
    shard = make_shard(
        tmp_path / "s.tar", [("a", {"png": png_bytes(), "cls": text}), ("b", {"png": png_bytes(), "cls": b"3"})]
    )
    items = read_back(shard)
    assert isinstance(items["a"], SampleError) and items["a"].reason == reason
    assert isinstance(items["b"], Sample) and items["b"].label == 3


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (
            b'{"n": ' + b"9" * 5000 + b"}",
            "invalid json 'a.json': Exceeds the limit (4300 digits) for integer string conversion",
        ),
        (b'{"name": "caf\xe9"}', "invalid json 'a.json': 'utf-8' codec can't decode byte 0xe9"),
        (b"[" * 100_000 + b"]" * 100_000, "invalid json 'a.json': maximum recursion depth exceeded"),
        (b'["a list"]', "invalid json 'a.json': expected an object, got list"),
    ],
)
def test_json_that_cannot_be_stored_is_that_samples_error(tmp_path, data, reason):
    items = read_back(
        make_shard(tmp_path / "s.tar", [("a", {"png": png_bytes(), "json": data}), ("b", {"png": png_bytes()})])
    )
    assert isinstance(items["a"], SampleError) and items["a"].reason.startswith(reason), items["a"].reason
    assert isinstance(items["b"], Sample)


def test_stored_json_is_ascii_even_for_lone_surrogates_and_nan(tmp_path):
    data = b'{"b": "\\ud800", "a": NaN, "c": "\xc3\xa9"}'
    sample = read_back(make_shard(tmp_path / "s.tar", [("a", {"png": png_bytes(), "json": data})]))["a"]
    assert isinstance(sample, Sample)
    assert sample.sample_json == '{"a": NaN, "b": "\\ud800", "c": "\\u00e9"}'
    assert sample.sample_json.encode("ascii")


def test_member_names_that_are_not_utf8_are_that_samples_error(tmp_path):
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tar:
        for name, data in [("caf\udce9.png", png_bytes()), ("ok.png", png_bytes())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    items = read_back(shard)
    assert items["caf\udce9"].reason == "member name 'caf\\udce9.png' is not valid UTF-8, so its key cannot be stored"
    assert isinstance(items["ok"], Sample)


# --- rows that still cannot be written ------------------------------------------------------------------


@pytest.fixture(scope="module")
def processor(tmp_path_factory: pytest.TempPathFactory):
    return in_process_processor(tmp_path_factory.mktemp("bad-samples"), "topk:2")


def explained_row(processor, local_row: int, **changes) -> ExplainedRow:
    layout = processor.layout
    arrays = {
        spec.name: np.zeros(layout.chunks(spec)[1:], dtype=layout.dtype(spec))
        for spec in array_specs(layout.store_basis)
    }
    table = {
        "pred": 1,
        "pred_prob": 0.5,
        "topk_classes": [1, 2],
        "topk_probs": [0.5, 0.2],
        "targets": [1, 2],
        "target_names": ["dog", "zebra"],
        "relevance_pos_sum": [1.0, 1.0],
        "relevance_neg_sum": [-1.0, -1.0],
        "relevance_argmax": [0, 1],
    }
    row = ExplainedRow(
        local_row=local_row,
        key=f"k{local_row}",
        label=1,
        width=4,
        height=4,
        sample_json=None,
        arrays=arrays,
        table=table,
    )
    for name, value in changes.items():
        if name in table:
            table[name] = value
        else:
            setattr(row, name, value)
    return row


def test_a_row_its_columns_cannot_hold_becomes_that_samples_error(processor):
    storage = processor.storage
    writer = ShardWriter(
        storage, processor.group, processor.layout, 0, "direct", "direct.tar", 20, processor.config.run_id
    )
    bad = {3: dict(label=2**31), 4: dict(key="k\udcff"), 17: dict(pred=None), 18: dict(width=10**20)}
    for local_row in range(20):
        if local_row != 9:
            writer.add(explained_row(processor, local_row, **bad.get(local_row, {})))
    writer.add(explained_row(processor, 2))  # out of order
    writer.add_error("k9", "line one\nline two \udcff")
    summary = writer.finish()

    assert (summary.n_images, summary.n_errors, summary.n_shard_errors, summary.unaccounted()) == (
        15,
        6,
        0,
        "20 samples planned, but 15 explained + 6 in errors/",
    )
    metadata = read_table(processor.config.output, "metadata/000000-direct.parquet")
    assert [row["row"] for row in metadata] == [r for r in range(20) if r not in (3, 4, 9, 17, 18)]
    errors = {row["key"]: row["reason"] for row in read_table(processor.config.output, "errors/000000-direct.parquet")}
    assert errors == {
        "k3": "metadata column 'label' cannot hold 2147483648: ArrowInvalid: Value 2147483648 too large to fit in C integer type",
        "k\\udcff": "metadata column 'key' cannot hold 'k\\udcff': UnicodeEncodeError: 'utf-8' codec can't encode character '\\udcff' in position 1: surrogates not allowed",
        "k17": "metadata column 'pred' cannot hold None: ValueError: null in a non-nullable column",
        "k18": "metadata column 'width' cannot hold 100000000000000000000: OverflowError: Python int too large to convert to C long",
        "k2": "cannot store sample 2: rows must arrive in order (the last was 19) and below 20",
        "k9": "line one\\nline two \\udcff",
    }
    embedding = processor.group["embedding"][0:32, 0]
    assert np.isnan(embedding[[3, 4, 9, 17, 18]]).all() and not np.isnan(embedding[[0, 1, 2, 5, 16, 19]]).any()


def test_what_the_fuzz_tests_found_costs_one_sample_each(processor, tmp_path):
    # Each of these used to fail its whole shard (found by tests/test_fuzz.py on the code before issue 12):
    # an int32 overflow and an OverflowError in the metadata table, a 5000-digit label that int() refuses
    # (raised out of the reader: the rest of the shard was lost), a key Arrow cannot encode in errors/.
    shard = tmp_path / "found.tar"
    members = [
        ("good0.png", png_bytes()),
        ("big.png", png_bytes()),
        ("big.cls", b"2147483648"),
        ("huge.png", png_bytes()),
        ("huge.cls", b"99999999999999999999"),
        ("long.png", png_bytes()),
        ("long.cls", b"9" * 5000),
        ("caf\udce9.txt", b"no image either"),
        ("good1.png", png_bytes()),
        ("good1.cls", b"-3"),
    ]
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

    keys, summary = process(processor, str(shard))
    metadata, errors = assert_every_sample_accounted(processor, keys, summary)
    assert [(row["key"], row["label"]) for row in metadata] == [("good0", None), ("good1", -3)]
    assert {row["key"]: row["reason"] for row in errors} == {
        "big": "cls label 2147483648 in 'big.cls' does not fit the int32 label column (-2147483648..2147483647)",
        "huge": "cls label 99999999999999999999 in 'huge.cls' does not fit the int32 label column (-2147483648..2147483647)",
        "long": "cls label 99999999999999999999... (5000 digits) in 'long.cls' does not fit the int32 label column (-2147483648..2147483647)",
        "caf\\udce9": "member name 'caf\\udce9.txt' is not valid UTF-8, so its key cannot be stored",
    }


def test_summary_names_a_shard_whose_samples_are_not_all_accounted_for(tmp_path, capsys):
    storage = Storage.from_url(str(tmp_path / "out"))
    plan = SimpleNamespace(shards=[ShardTask(0, "a.tar", "a", 8), ShardTask(1, "b.tar", "b", 3)], storage=storage)
    summaries = {0: ShardSummary("a", 0, "a.tar", 8, 7, 1, 0, 16), 1: ShardSummary("b", 1, "b.tar", 3, 1, 2, 1, 16)}
    assert print_summary(plan, summaries, {}, PhaseClock(None), skipped=0, strict=False) == 1
    captured = capsys.readouterr()
    assert "UNACCOUNTED shard b: 3 samples planned, but 1 explained + 1 in errors/" in captured.out.splitlines()
    assert "UNACCOUNTED shard a" not in captured.out
    assert "1 shard(s) do not have each sample either explained or in errors/ exactly once" in captured.err


@pytest.mark.parametrize("header", [b"\x1f\x8b\x08", b"\x1f\x8b\x08\x04"])
def test_a_gzip_header_cut_short_is_a_shard_level_error_not_a_crash(tmp_path, capsys, header):
    # Found by tests/test_fuzz.py: tarfile's gzip reader raised TypeError out of scan_shard, which crashed
    # the driver while it planned the job, whatever the other shards held.
    cut = tmp_path / "cut-0001.tar.gz"
    cut.write_bytes(header)
    assert scan_shard(str(cut)) == ShardScan([], "not a tar file: truncated gzip header")
    assert list(iter_samples(str(cut))) == [(None, SampleError(None, "not a tar file: truncated gzip header"))]

    good = make_shard(tmp_path / "good-0000.tar", [("a", {"png": png_bytes(), "cls": b"1"})])
    argv = [
        "explain",
        "--shards",
        str(good),
        str(cut),
        "--output",
        str(tmp_path / "out"),
        "--checkpoint",
        write_checkpoint(tmp_path / "model.pt"),
        "--dry-run",
    ]
    assert main(argv) == 0
    assert "shards       2 (1 samples" in capsys.readouterr().out
