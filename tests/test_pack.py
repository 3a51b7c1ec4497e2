"""``cdam pack``: image folders (ImageNet, CSV-labelled, flat) to shards, read back by ``cdam explain``."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cdam_worker.shards.samples import Sample
from cdam_worker.shards.tar_reader import iter_samples
from cdam_worker.storage import Storage
from helpers import gradient_image, image_bytes, jpeg_bytes, png_bytes, save_tiny_vit
from jobs.cli import main
from jobs.verify import verify_output

NOT_AN_IMAGE = "not an image file (extensions: jpg, jpeg, png, webp, bmp, tif, tiff, gif, ppm, pgm, pnm)"
TINY_VIT = dict(img_size=32, patch_size=16, depth=1, embed_dim=24, num_heads=2, num_classes=1000)


def write_files(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One source folder per layout, each with files that cannot be packed, and a labels CSV."""
    root = tmp_path_factory.mktemp("sources")
    imagenet = write_files(
        root / "imagenet",
        {
            "n01440764/ILSVRC2012_val_00000293.JPEG": jpeg_bytes(40, 30),
            "n01440764/ILSVRC2012_val_00002138.JPEG": jpeg_bytes(20, 50, "L"),
            "n01440764/v1.2.crop.JPEG": jpeg_bytes(33, 33),  # dots in the name: the key gets '_'
            "n15075141/tissue.png": png_bytes(24, 24, "RGBA"),
            "n15075141/tissue.jpg": jpeg_bytes(24, 24),  # same key as tissue.png: gets '_2'
            "n15075141/broken.JPEG": jpeg_bytes(24, 24)[:40],  # cut off: unreadable
            "holiday/beach.jpg": jpeg_bytes(16, 16),  # not a wnid
            "README.txt": b"ImageNet val, a few images",
        },
    )
    flat = write_files(
        root / "flat",
        {
            "cat.png": png_bytes(30, 20),
            "sub/dog.jpg": jpeg_bytes(18, 26, "CMYK"),
            "sub/bird.bmp": image_bytes(gradient_image(12, 12), "BMP"),
            "garbage.jpg": b"this is not a JPEG",
            "notes.md": b"# notes",
        },
    )
    csv_source = write_files(root / "csv", {f"p{i}.jpg": jpeg_bytes(20 + i, 20) for i in range(5)})
    (root / "flat" / b"caf\xe9.png".decode(errors="surrogateescape")).write_bytes(png_bytes())  # a Latin-1 file name
    write_files(
        csv_source, {"p5.jpg": jpeg_bytes(), "unlisted.png": png_bytes(), "broken.png": b"\x89PNG\r\n\x1a\n broken"}
    )
    labels = root / "labels.csv"
    labels.write_text(
        "filename,label\np0.jpg,3\np1.jpg,0\np2.jpg, 5\np3.jpg,cat\nmissing.jpg,1\nbroken.png,2\np4.jpg,1\np0.jpg,2\n../etc/passwd,1\nunlisted.png,99999999999\n"
    )
    return {"imagenet": imagenet, "flat": flat, "csv": csv_source, "labels": labels}


def read_tar(path: Path | bytes) -> list[tuple[str, bytes]]:
    fileobj = io.BytesIO(path) if isinstance(path, bytes) else open(path, "rb")
    with fileobj, tarfile.open(fileobj=fileobj) as tar:
        return [(member.name, tar.extractfile(member).read()) for member in tar.getmembers()]


def pack_into(out: Path | str, source: Path, *flags: str) -> int:
    return main(["pack", str(source), str(out), "--workers", "2", *flags])


def test_imagenet_layout_labels_from_wnid_folders(sources, tmp_path, capsys):
    out = tmp_path / "packed"
    assert pack_into(out, sources["imagenet"], "--layout", "imagenet", "--maxcount", "2") == 0
    captured = capsys.readouterr()
    index = json.loads((out / "index.json").read_text())
    assert [s["shard"] for s in index["shards"]] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [s["samples"] for s in index["shards"]] == [2, 2, 1]
    assert [s["bytes"] for s in index["shards"]] == [(out / s["shard"]).stat().st_size for s in index["shards"]]
    assert sorted(p.name for p in out.iterdir()) == [
        "index.json",
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000002.tar",
    ]
    assert index["skipped"] == [
        {"file": "README.txt", "reason": NOT_AN_IMAGE},
        {"file": "holiday/beach.jpg", "reason": "folder 'holiday' is not an ImageNet-1k wnid"},
        {"file": "n15075141/broken.JPEG", "reason": index["skipped"][2]["reason"]},
    ]
    assert index["skipped"][2]["reason"].startswith("corrupt image 'n15075141/broken.JPEG': ")
    assert "cdam pack: skipped n15075141/broken.JPEG: corrupt image 'n15075141/broken.JPEG'" in captured.err
    assert "packed 5 images into 3 shard(s)" in captured.out and "3 file(s) skipped" in captured.out

    members = [m for s in index["shards"] for m in read_tar(out / s["shard"])]
    names = [name for name, _ in members]
    assert names == [
        "n01440764/ILSVRC2012_val_00000293.cls",
        "n01440764/ILSVRC2012_val_00000293.jpeg",
        "n01440764/ILSVRC2012_val_00000293.json",
        "n01440764/ILSVRC2012_val_00002138.cls",
        "n01440764/ILSVRC2012_val_00002138.jpeg",
        "n01440764/ILSVRC2012_val_00002138.json",
        "n01440764/v1_2_crop.cls",
        "n01440764/v1_2_crop.jpeg",
        "n01440764/v1_2_crop.json",
        "n15075141/tissue.cls",
        "n15075141/tissue.jpg",
        "n15075141/tissue.json",
        "n15075141/tissue_2.cls",
        "n15075141/tissue_2.json",
        "n15075141/tissue_2.png",
    ]
    data = dict(members)
    assert (
        data["n01440764/v1_2_crop.cls"] == b"0" and data["n15075141/tissue_2.cls"] == b"999"
    )  # timm's ImageNet-1k order
    assert json.loads(data["n15075141/tissue_2.json"]) == {"filename": "n15075141/tissue.png"}
    assert data["n15075141/tissue_2.png"] == (sources["imagenet"] / "n15075141/tissue.png").read_bytes()


def test_csv_layout_labels_from_the_file_and_bad_rows_are_listed(sources, tmp_path, capsys):
    out = tmp_path / "packed"
    assert pack_into(out, sources["csv"], "--labels", str(sources["labels"])) == 0  # --labels implies --layout csv
    index = json.loads((out / "index.json").read_text())
    assert index["layout"] == "csv" and index["samples"] == 4 and len(index["shards"]) == 1
    assert index["skipped"] == [
        {"file": "../etc/passwd", "reason": "labels.csv line 10: filename must be a path inside the source folder"},
        {"file": "broken.png", "reason": index["skipped"][1]["reason"]},
        {"file": "missing.jpg", "reason": "labels.csv line 6: no such file in the source folder"},
        {"file": "p0.jpg", "reason": "labels.csv line 9: repeats the file of line 2"},
        {"file": "p3.jpg", "reason": "labels.csv line 5: label 'cat' is not an integer from 0 to 2147483647"},
        {"file": "p5.jpg", "reason": "no row in labels.csv"},
        {
            "file": "unlisted.png",
            "reason": "labels.csv line 11: label '99999999999' is not an integer from 0 to 2147483647",
        },
    ]
    assert index["skipped"][1]["reason"].startswith("corrupt image 'broken.png': ")
    labels = {name: data for name, data in read_tar(out / "shard-000000.tar") if name.endswith(".cls")}
    assert labels == {"p0.cls": b"3", "p1.cls": b"0", "p2.cls": b"5", "p4.cls": b"1"}
    assert "7 file(s) skipped" in capsys.readouterr().out  # every row and file above, each listed once


def test_flat_layout_has_no_labels_and_shards_are_byte_deterministic(sources, tmp_path):
    assert main(["pack", str(sources["flat"]), str(tmp_path / "one"), "--workers", "1"]) == 0
    assert pack_into(tmp_path / "two", sources["flat"], "--layout", "flat") == 0
    for name in ("shard-000000.tar", "index.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    samples = [item for _, item in iter_samples(str(tmp_path / "one" / "shard-000000.tar"))]
    assert [(s.key, s.label, s.meta, s.width, s.height) for s in samples] == [
        ("cat", None, {"filename": "cat.png"}, 30, 20),
        ("sub/bird", None, {"filename": "sub/bird.bmp"}, 12, 12),
        ("sub/dog", None, {"filename": "sub/dog.jpg"}, 18, 26),
    ]
    skipped = json.loads((tmp_path / "one" / "index.json").read_text())["skipped"]
    assert skipped == [
        {"file": "caf\ufffd.png", "reason": "file name is not valid UTF-8"},
        {"file": "garbage.jpg", "reason": "corrupt image 'garbage.jpg': cannot identify image file"},
        {"file": "notes.md", "reason": NOT_AN_IMAGE},
    ]


def test_pack_to_s3_writes_the_same_objects_as_a_local_pack(sources, tmp_path, s3_bucket):
    url = f"s3://{s3_bucket}/packed/val"
    assert pack_into(url, sources["imagenet"], "--layout", "imagenet", "--maxcount", "3") == 0
    assert pack_into(tmp_path / "local", sources["imagenet"], "--layout", "imagenet", "--maxcount", "3") == 0
    s3 = Storage.from_url(url)
    assert s3.list() == ["index.json", "shard-000000.tar", "shard-000001.tar"]
    for name in s3.list():
        assert s3.get(name) == (tmp_path / "local" / name).read_bytes()
    samples = [item for _, item in iter_samples(f"{url}/shard-000001.tar")]
    assert all(isinstance(s, Sample) for s in samples) and [s.label for s in samples] == [999, 999]


def test_explain_reads_packed_shards_with_their_labels(sources, tmp_path, ray_local):
    checkpoint = save_tiny_vit(tmp_path / "model.pt", TINY_VIT, [f"class {i}" for i in range(1000)])
    assert pack_into(tmp_path / "imagenet", sources["imagenet"], "--layout", "imagenet", "--maxcount", "3") == 0
    assert pack_into(tmp_path / "csv", sources["csv"], "--labels", str(sources["labels"])) == 0
    output = tmp_path / "cdam-out"
    shards = [str(tmp_path / "imagenet" / "shard-*.tar"), str(tmp_path / "csv" / "shard-*.tar")]
    assert (
        main(
            [
                "explain",
                "--shards",
                *shards,
                "--output",
                str(output),
                "--checkpoint",
                str(checkpoint),
                "--targets",
                "label",
                "--strict",
                "--actors",
                "1",
                "--batch-size",
                "4",
            ]
        )
        == 0
    )
    rows = [row for path in sorted((output / "metadata").iterdir()) for row in pq.read_table(path).to_pylist()]
    assert {row["key"]: (row["label"], row["targets"]) for row in rows} == {
        "n01440764/ILSVRC2012_val_00000293": (0, [0]),
        "n01440764/ILSVRC2012_val_00002138": (0, [0]),
        "n01440764/v1_2_crop": (0, [0]),
        "n15075141/tissue": (999, [999]),
        "n15075141/tissue_2": (999, [999]),
        "p0": (3, [3]),
        "p1": (0, [0]),
        "p2": (5, [5]),
        "p4": (1, [1]),
    }
    assert json.loads(next(r for r in rows if r["key"] == "p2")["sample_json"]) == {"filename": "p2.jpg"}
    assert not (output / "errors").exists() or not list((output / "errors").iterdir())
    assert verify_output(str(output)) == []


@pytest.mark.parametrize(
    "case",
    ["csv without labels", "labels with imagenet", "no wnid folder", "missing source", "bad csv header", "maxcount 0"],
)
def test_bad_invocations_are_one_line_errors(case, sources, tmp_path, capsys):
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("file,class\np0.jpg,1\n")
    args = {
        "csv without labels": [str(sources["flat"]), "--layout", "csv"],
        "labels with imagenet": [str(sources["csv"]), "--layout", "imagenet", "--labels", str(sources["labels"])],
        "no wnid folder": [str(sources["flat"]), "--layout", "imagenet"],
        "missing source": [str(tmp_path / "nowhere")],
        "bad csv header": [str(sources["csv"]), "--labels", str(bad_csv)],
        "maxcount 0": [str(sources["flat"]), "--maxcount", "0"],
    }[case]
    expected = {
        "csv without labels": "--labels FILE.csv goes with --layout csv (and --layout csv needs --labels)",
        "labels with imagenet": "--labels FILE.csv goes with --layout csv",
        "no wnid folder": "no folder of the source is an ImageNet-1k wnid (like n01440764); use --layout csv or flat",
        "missing source": f"source folder {tmp_path / 'nowhere'} does not exist or is not a folder",
        "bad csv header": f"--labels {bad_csv}: expected a header with the columns filename,label, got file,class",
        "maxcount 0": "--maxcount must be >= 1, got 0",
    }[case]
    assert main(["pack", args[0], str(tmp_path / "out"), *args[1:]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cdam pack: error: ") and expected in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_an_earlier_pack_is_refused_unless_overwrite(sources, tmp_path, capsys):
    out = tmp_path / "packed"
    assert pack_into(out, sources["imagenet"], "--layout", "imagenet", "--maxcount", "1") == 0
    assert len(list(out.glob("shard-*.tar"))) == 5
    capsys.readouterr()
    assert pack_into(out, sources["flat"]) == 2
    assert (
        f"{out} already holds 5 shard(s) and index.json of an earlier pack; use --overwrite to replace them"
        in capsys.readouterr().err
    )
    (out / "notes.txt").write_text("kept")
    assert pack_into(out, sources["flat"], "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "notes.txt", "shard-000000.tar"]


def test_an_earlier_index_alone_is_named_as_such(sources, tmp_path, capsys):
    out = tmp_path / "packed"
    out.mkdir()
    (out / "index.json").write_text("{}")
    assert pack_into(out, sources["flat"]) == 2
    assert f"{out} already holds index.json of an earlier pack; use --overwrite" in capsys.readouterr().err


def test_nothing_packable_still_prints_and_lists_every_skipped_file(tmp_path, capsys):
    source = write_files(
        tmp_path / "src", {"notes.txt": b"notes", "broken.jpg": b"not a JPEG", "sub/cut.png": png_bytes()[:30]}
    )
    out = tmp_path / "packed"
    assert pack_into(out, source) == 2
    err = capsys.readouterr().err
    index = json.loads((out / "index.json").read_text())
    assert index["shards"] == [] and index["samples"] == 0
    assert [s["file"] for s in index["skipped"]] == ["broken.jpg", "notes.txt", "sub/cut.png"]
    assert index["skipped"][1]["reason"] == NOT_AN_IMAGE
    for skipped in index["skipped"]:
        assert f"cdam pack: skipped {skipped['file']}: {skipped['reason']}\n" in err
    assert err.endswith(
        f"cdam pack: error: no image to pack below {source} (layout flat): 3 file(s) skipped, listed in {out}/index.json\n"
    )
    assert sorted(p.name for p in out.iterdir()) == ["index.json"]
