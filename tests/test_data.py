"""WebDataset shard reading: spec expansion, header scans, safe decoding of good and bad input."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cdam_worker.shards import member_index, samples
from cdam_worker.shards.member_index import member_offsets
from cdam_worker.shards.samples import Sample, SampleError
from cdam_worker.shards.specs import DataError, expand_shard_specs, shard_name
from cdam_worker.shards.tar_reader import ShardScan, iter_samples, scan_shard
from cdam_worker.storage import Storage
from tests.helpers import S3Proxy, gradient_image, image_bytes, jpeg_bytes, make_shard, make_tar, png_bytes


def read_all(url: str, **options: bool) -> list[tuple[int | None, Sample | SampleError]]:
    """Every item of iter_samples, checking its group numbering against scan_shard."""
    items = list(iter_samples(url, **options))
    scan = scan_shard(url)
    indexed = [(index, item) for index, item in items if index is not None]
    assert [index for index, _ in indexed] == list(range(len(scan.keys)))
    assert [item.key for _, item in indexed] == scan.keys
    shard_errors = [item.reason for index, item in items if index is None]
    assert shard_errors == ([scan.error] if scan.error else [])
    return items


def outcome(items: list[tuple[int | None, Sample | SampleError]]) -> list[tuple[str | None, object]]:
    """(key, label) for samples and (key, reason) for errors, in order."""
    return [(item.key, item.label if isinstance(item, Sample) else item.reason) for _, item in items]


def only_sample(items: list[tuple[int | None, Sample | SampleError]]) -> Sample:
    assert len(items) == 1 and isinstance(items[0][1], Sample), items
    return items[0][1]


def only_error(items: list[tuple[int | None, Sample | SampleError]]) -> str:
    assert len(items) == 1 and isinstance(items[0][1], SampleError), items
    return items[0][1].reason


def shard_of(tmp_path: Path, members: dict[str, bytes], name: str = "shard.tar") -> str:
    return str(make_tar(tmp_path / name, list(members.items())))


def three_samples() -> list[tuple[str, dict[str, bytes]]]:
    return [(f"sample{i}", {"jpg": jpeg_bytes(), "cls": str(i).encode(), "json": b'{"i": %d}' % i}) for i in range(3)]


# --- shard specs -------------------------------------------------------------------------------------


@pytest.fixture
def shard_folder(tmp_path: Path) -> Path:
    for i in range(4):
        make_tar(tmp_path / f"val-{i:04d}.tar", [])
    make_tar(tmp_path / "train-0000.tar", [])
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "dir.tar").mkdir()
    return tmp_path


def test_expand_braces_globs_order_and_duplicates(shard_folder: Path) -> None:
    root = str(shard_folder)
    assert expand_shard_specs([f"{root}/val-{{0001..0002}}.tar"]) == [f"{root}/val-0001.tar", f"{root}/val-0002.tar"]
    assert expand_shard_specs([f"{root}/*.tar"]) == [
        f"{root}/train-0000.tar",
        *(f"{root}/val-{i:04d}.tar" for i in range(4)),
    ]
    assert expand_shard_specs([f"{root}/val-000[13].tar", f"{root}/train-000?.tar", f"{root}/val-0001.tar"]) == [
        f"{root}/val-0001.tar",
        f"{root}/val-0003.tar",
        f"{root}/train-0000.tar",
    ]


def test_expand_relative_and_file_urls(shard_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(shard_folder)
    assert expand_shard_specs(["val-0000.tar", f"file://{shard_folder}/val-0001.tar"]) == [
        f"{shard_folder}/val-0000.tar",
        f"{shard_folder}/val-0001.tar",
    ]


def test_expand_errors(shard_folder: Path) -> None:
    root = str(shard_folder)
    for spec in (f"{root}/test-*.tar", f"{root}/missing.tar", f"{root}/dir.tar", f"{root}/test-{{0..3}}.tar"):
        with pytest.raises(DataError) as error:
            expand_shard_specs([spec])
        assert str(error.value) == f"shard spec {spec!r} matches no file"
    spec = f"{root}/val-{{0000..0004}}.tar"
    with pytest.raises(DataError) as error:
        expand_shard_specs([spec])
    assert str(error.value) == f"shard {root + '/val-0004.tar'!r} (from spec {spec!r}) does not exist"


def test_expand_s3_specs(s3_bucket: str) -> None:
    storage = Storage.from_url(f"s3://{s3_bucket}")
    for name in ("data/val-0000.tar", "data/val-0001.tar", "data/val-0002.tar", "data/sub/val-0009.tar", "top.tar"):
        storage.put(name, b"")
    base = f"s3://{s3_bucket}/data"
    assert expand_shard_specs([f"{base}/val-{{0000..0001}}.tar"]) == [f"{base}/val-0000.tar", f"{base}/val-0001.tar"]
    assert expand_shard_specs([f"{base}/val-*.tar"]) == [f"{base}/val-{i:04d}.tar" for i in range(3)]
    assert expand_shard_specs([f"{base}/*/val-*.tar", f"s3://{s3_bucket}/top.tar"]) == [
        f"{base}/sub/val-0009.tar",
        f"s3://{s3_bucket}/top.tar",
    ]
    with pytest.raises(DataError, match=r"shard spec 's3://.*/data/test-\*.tar' matches no file"):
        expand_shard_specs([f"{base}/test-*.tar"])
    with pytest.raises(DataError, match=r"cannot list shards.*bucket does not exist"):
        expand_shard_specs(["s3://cdam-no-such-bucket/val-*.tar"])


def test_shard_name() -> None:
    assert shard_name("/data/val-0003.tar") == "val-0003"
    assert shard_name("s3://b/p/val-0003.tar.gz") == "val-0003"
    assert shard_name("s3://b/p/val.tgz") == "val"
    assert shard_name("plain") == "plain"


# --- reading good shards ---------------------------------------------------------------------------


def test_samples_are_decoded_with_labels_meta_and_text(tmp_path: Path) -> None:
    samples = three_samples()
    samples[2][1]["txt"] = "a caption ✓".encode()
    url = str(make_shard(tmp_path / "val-0000.tar", samples))
    items = read_all(url)
    assert outcome(items) == [("sample0", 0), ("sample1", 1), ("sample2", 2)]
    first, last = items[0][1], items[2][1]
    assert isinstance(first, Sample) and isinstance(last, Sample)
    assert first.image.mode == "RGB" and first.image.size == (16, 12) and (first.width, first.height) == (16, 12)
    assert first.meta == {"i": 0} and first.text is None and last.text == "a caption ✓"


def test_keys_include_folders_and_extensions_are_case_insensitive(tmp_path: Path) -> None:
    url = shard_of(tmp_path, {"train/n01/x.JPG": jpeg_bytes(), "train/n01/x.cls": b"7", "train/n01/x.seg.png": b"?"})
    sample = only_sample(read_all(url))
    assert (sample.key, sample.label) == ("train/n01/x", 7)  # 'seg.png' is another extension, not an image
    url = shard_of(tmp_path, {"v1.2/y.z.jpg": jpeg_bytes()}, name="dots.tar")
    assert read_all(url) == [(0, SampleError("v1.2/y", "no image member (members: v1.2/y.z.jpg)"))]


def test_long_member_names_in_pax_headers(tmp_path: Path) -> None:
    key = "folder/" + "k" * 200 + "é"
    samples = [(key, {"jpg": jpeg_bytes(), "cls": b"4"}), ("short", {"png": png_bytes()})]
    url = str(make_shard(tmp_path / "long.tar", samples))
    assert outcome(read_all(url)) == [(key, 4), ("short", None)]


def test_gzipped_shards(tmp_path: Path) -> None:
    url = str(make_shard(tmp_path / "val-0000.tar.gz", three_samples()))
    assert outcome(read_all(url)) == [("sample0", 0), ("sample1", 1), ("sample2", 2)]


def test_first_image_extension_wins(tmp_path: Path) -> None:
    url = shard_of(tmp_path, {"k.png": png_bytes(8, 8), "k.jpeg": jpeg_bytes(20, 10), "k.jpg": jpeg_bytes(16, 12)})
    assert only_sample(read_all(url)).image.size == (16, 12)


@pytest.mark.parametrize("extension", ["cls", "cls2", "class", "label"])
def test_label_extensions(tmp_path: Path, extension: str) -> None:
    url = shard_of(tmp_path, {"k.jpg": jpeg_bytes(), f"k.{extension}": b" 42\n"})
    assert only_sample(read_all(url)).label == 42


def test_missing_label_is_none_unless_required(tmp_path: Path) -> None:
    url = shard_of(tmp_path, {"k.jpg": jpeg_bytes()})
    assert only_sample(read_all(url)).label is None
    assert only_error(read_all(url, require_label=True)) == "missing cls label"


def test_empty_tar_yields_nothing(tmp_path: Path) -> None:
    url = str(make_tar(tmp_path / "empty.tar", []))
    assert read_all(url) == []
    assert scan_shard(url).error is None


def test_iter_samples_streams_without_holding_the_shard(tmp_path: Path) -> None:
    filler = np.random.default_rng(0).bytes(1 << 20)
    url = str(make_shard(tmp_path / "big.tar", [(f"k{i}", {"jpg": jpeg_bytes(), "npy": filler}) for i in range(24)]))
    tracemalloc.start()
    try:
        count = sum(1 for _ in iter_samples(url))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 24 and peak < 8 << 20  # the shard is 24 MiB


# --- image modes -------------------------------------------------------------------------------------


def decode(tmp_path: Path, name: str, payload: bytes) -> Sample:
    return only_sample(read_all(shard_of(tmp_path, {name: payload})))


@pytest.mark.parametrize(
    ("mode", "extension", "format"),
    [
        ("L", "jpg", "JPEG"),
        ("CMYK", "jpg", "JPEG"),
        ("1", "png", "PNG"),
        ("P", "png", "PNG"),
        ("L", "png", "PNG"),
        ("RGB", "webp", "WEBP"),
        ("RGB", "bmp", "BMP"),
        ("P", "gif", "GIF"),
        ("RGB", "ppm", "PPM"),
        ("L", "pgm", "PPM"),
        ("RGB", "tiff", "TIFF"),
        ("CMYK", "tif", "TIFF"),
    ],
)
def test_image_modes_become_rgb(tmp_path: Path, mode: str, extension: str, format: str) -> None:
    original = gradient_image(16, 12, mode)
    options = {"lossless": True} if format == "WEBP" else {}
    sample = decode(tmp_path, f"k.{extension}", image_bytes(original, format, **options))
    assert sample.image.mode == "RGB" and sample.image.size == (16, 12)
    expected = np.asarray(original.convert("RGB"), dtype=np.int16)
    tolerance = 40 if format == "JPEG" or mode == "P" else 1  # lossy JPEG, GIF/PNG palette quantisation
    assert np.abs(np.asarray(sample.image, dtype=np.int16) - expected).mean() < tolerance


def test_transparency_is_composited_over_white(tmp_path: Path) -> None:
    rgba = Image.fromarray(np.array([[[255, 0, 0, 0], [0, 0, 255, 255], [0, 0, 0, 128]]], dtype=np.uint8), "RGBA")
    pixels = np.asarray(decode(tmp_path, "k.png", image_bytes(rgba)).image)
    assert pixels.tolist() == [[[255, 255, 255], [0, 0, 255], [127, 127, 127]]]
    la = Image.fromarray(np.array([[[0, 0], [0, 255]]], dtype=np.uint8), "LA")
    assert np.asarray(decode(tmp_path, "la.png", image_bytes(la)).image).tolist() == [[[255] * 3, [0] * 3]]
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0])
    palette.putdata([0, 1])
    pixels = np.asarray(decode(tmp_path, "p.png", image_bytes(palette, transparency=0)).image)
    assert pixels.tolist() == [[[255, 255, 255], [0, 255, 0]]]


def test_16_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    pixels = np.asarray(decode(tmp_path, "k.png", image_bytes(image)).image)
    assert pixels[..., 0].tolist() == [[0, 1, 128, 255]]
    assert (pixels[..., 0] == pixels[..., 2]).all()


def test_32_bit_integer_and_float_tiffs(tmp_path: Path) -> None:
    integers = Image.fromarray(np.array([[0, 257, 65535]], dtype=np.int32))
    assert integers.mode == "I"
    assert np.asarray(decode(tmp_path, "i.tif", image_bytes(integers, "TIFF")).image)[..., 0].tolist() == [[0, 1, 255]]
    unit = Image.fromarray(np.array([[0.0, 0.25, 1.0]], dtype=np.float32))
    assert np.asarray(decode(tmp_path, "f.tiff", image_bytes(unit, "TIFF")).image)[..., 0].tolist() == [[0, 64, 255]]
    wide = Image.fromarray(np.array([[-10.0, 0.0, 500.0]], dtype=np.float32))
    assert np.asarray(decode(tmp_path, "w.tiff", image_bytes(wide, "TIFF")).image)[..., 0].tolist() == [[0, 5, 255]]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # a 4x2 photo stored sideways: orientation 6 means "rotate 90 degrees clockwise to view"
    stored = np.zeros((2, 4, 3), dtype=np.uint8)
    stored[0, 0] = (255, 0, 0)  # a red corner, top left as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    payload = image_bytes(Image.fromarray(stored), "PNG", exif=exif.tobytes())
    sample = decode(tmp_path, "photo.png", payload)
    assert (sample.width, sample.height) == (2, 4) and sample.image.size == (2, 4)
    assert np.asarray(sample.image)[0, 1].tolist() == [255, 0, 0]  # now top right, as a viewer shows it


def test_one_pixel_image_is_valid(tmp_path: Path) -> None:
    sample = decode(tmp_path, "k.png", png_bytes(1, 1))
    assert (sample.width, sample.height) == (1, 1)


# --- bad samples ---------------------------------------------------------------------------------------


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels but holds no pixel data (a decompression bomb)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [10_000, 20_000])  # between 1x and 2x Pillow's limit (a warning), and above 2x
def test_decompression_bombs_are_refused(tmp_path: Path, side: int) -> None:
    reason = only_error(read_all(shard_of(tmp_path, {"k.png": png_header(side, side), "k.cls": b"1"})))
    assert reason.startswith("decompression bomb: 'k.png': ")


def test_decompression_bomb_limit_holds_when_pillow_guard_is_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    monkeypatch.setattr(samples, "MAX_IMAGE_PIXELS", 100)
    reason = only_error(read_all(shard_of(tmp_path, {"k.png": png_bytes(11, 10)})))
    assert reason == "decompression bomb: 'k.png': 11x10 pixels exceed the limit of 100"


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (jpeg_bytes()[:200], "corrupt image 'k.jpg': "),
        (b"this is not an image", "corrupt image 'k.jpg': cannot identify image file"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "corrupt image 'k.jpg': cannot identify image file"),
        (b"", "corrupt image 'k.jpg': cannot identify image file"),
    ],
)
def test_corrupt_images(tmp_path: Path, payload: bytes, expected: str) -> None:
    reason = only_error(read_all(shard_of(tmp_path, {"k.jpg": payload, "k.cls": b"1"})))
    assert reason.startswith(expected) and "\n" not in reason


@pytest.mark.parametrize(
    ("members", "expected"),
    [
        ({"k.jpg": jpeg_bytes(), "k.cls": b"cat"}, "non-integer cls 'k.cls': 'cat'"),
        ({"k.jpg": jpeg_bytes(), "k.cls": b"1.5"}, "non-integer cls 'k.cls': '1.5'"),
        ({"k.cls": b"1", "k.json": b"{}"}, "no image member (members: k.cls, k.json)"),
        ({"k.jpg": jpeg_bytes(), "k.json": b"{not json"}, "invalid json 'k.json': Expecting property name"),
        ({"k.jpg": jpeg_bytes(), "k.json": b"[1, 2]"}, "invalid json 'k.json': expected an object, got list"),
        ({"/abs/k.jpg": jpeg_bytes()}, "unsafe member path '/abs/k.jpg'"),
        ({"../k.jpg": jpeg_bytes()}, "unsafe member path '../k.jpg'"),
        ({"a/../../k.jpg": jpeg_bytes()}, "unsafe member path 'a/../../k.jpg'"),
    ],
)
def test_bad_samples(tmp_path: Path, members: dict[str, bytes], expected: str) -> None:
    assert only_error(read_all(shard_of(tmp_path, members))).startswith(expected)


def test_bad_sample_does_not_stop_the_shard(tmp_path: Path) -> None:
    samples = three_samples()
    samples[1][1]["jpg"] = b"garbage"
    url = str(make_shard(tmp_path / "s.tar", samples))
    assert outcome(read_all(url)) == [
        ("sample0", 0),
        ("sample1", "corrupt image 'sample1.jpg': cannot identify image file"),
        ("sample2", 2),
    ]


def test_duplicate_keys(tmp_path: Path) -> None:
    members = [("a.jpg", jpeg_bytes()), ("b.jpg", jpeg_bytes()), ("a.cls", b"1"), ("b.jpg", jpeg_bytes())]
    url = str(make_tar(tmp_path / "dup.tar", members))
    assert scan_shard(url).keys == ["a", "b", "a", "b"]
    assert outcome(read_all(url)) == [
        ("a", None),
        ("b", None),
        ("a", "duplicate key 'a' (first seen at sample 0)"),
        ("b", "duplicate key 'b' (first seen at sample 1)"),
    ]


def test_repeated_member_in_one_sample(tmp_path: Path) -> None:
    url = str(make_tar(tmp_path / "rep.tar", [("a.jpg", jpeg_bytes()), ("a.jpg", jpeg_bytes())]))
    assert only_error(read_all(url)) == "repeated member extension jpg (members: a.jpg, a.jpg)"


def test_oversized_members_are_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(samples, "MAX_MEMBER_BYTES", 100)
    url = shard_of(tmp_path, {"k.jpg": jpeg_bytes(), "k.npy": bytes(1000)})
    assert only_error(read_all(url)).startswith("member 'k.jpg' is too large (")


def test_pickles_are_never_loaded(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"

    class Exploit:
        def __reduce__(self) -> tuple[object, ...]:
            return (open, (str(marker), "w"))

    payload = pickle.dumps(Exploit())
    url = shard_of(
        tmp_path,
        {
            "k.jpg": jpeg_bytes(),
            "k.pyd": payload,
            "k.pickle": payload,
            "k.pth": payload,
            "k.npy": payload,
            "k.cls": b"3",
        },
    )
    assert only_sample(read_all(url)).label == 3
    assert not marker.exists()


def test_links_folders_and_devices_are_ignored(tmp_path: Path) -> None:
    def special(name: str, kind: bytes, link: str = "") -> tuple[tarfile.TarInfo, bytes]:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, link
        return info, b""

    url = str(
        make_tar(
            tmp_path / "links.tar",
            [
                special("k", tarfile.DIRTYPE),
                ("k/a.jpg", jpeg_bytes()),
                special("k/a.cls", tarfile.SYMTYPE, "/etc/passwd"),
                ("k/a.cls", b"5"),
                special("evil.jpg", tarfile.SYMTYPE, "/etc/passwd"),
                special("hard.jpg", tarfile.LNKTYPE, "k/a.jpg"),
                special("dev.jpg", tarfile.CHRTYPE),
                special("fifo.jpg", tarfile.FIFOTYPE),
                ("b.png", png_bytes()),
            ],
        )
    )
    assert scan_shard(url).keys == ["k/a", "b"]
    assert outcome(read_all(url)) == [("k/a", 5), ("b", None)]


# --- bad shards ----------------------------------------------------------------------------------------


def member_end_offsets(url: str) -> list[int]:
    """Byte offset where each member's padded data ends (and the next header starts)."""
    with tarfile.open(url) as tar:
        return [info.offset_data + -(-info.size // 512) * 512 for info in tar.getmembers()]


def cut_inside_member(tar: Path, member: int) -> bytes:
    """The tar's bytes up to 100 bytes into the data of member ``member`` (counted from 0)."""
    return tar.read_bytes()[: member_end_offsets(str(tar))[member - 1] + 512 + 100]


INCOMPLETE = "truncated tar: sample may be incomplete"


def test_truncated_tar_inside_a_sample(tmp_path: Path) -> None:
    cut = tmp_path / "cut.tar"
    cut.write_bytes(cut_inside_member(make_shard(tmp_path / "full.tar", three_samples()), 6))  # sample2.jpg
    assert outcome(read_all(str(cut))) == [
        ("sample0", 0),
        ("sample1", 1),
        ("sample2", INCOMPLETE),
        (None, "truncated tar after 6 members: unexpected end of data"),
    ]


def test_tar_cut_between_members_is_truncated(tmp_path: Path) -> None:
    """Without the end-of-archive marker the last sample may have lost members: it is not trusted."""
    full = make_shard(tmp_path / "full.tar", three_samples())
    cut = tmp_path / "cut.tar"
    cut.write_bytes(full.read_bytes()[: member_end_offsets(str(full))[-1]])
    assert outcome(read_all(str(cut))) == [
        ("sample0", 0),
        ("sample1", 1),
        ("sample2", INCOMPLETE),
        (None, "truncated tar after 9 members: unexpected end of data"),
    ]


def test_truncated_gzip_tar(tmp_path: Path) -> None:
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(gzip.compress(cut_inside_member(make_shard(tmp_path / "full.tar", three_samples()), 3)))
    assert outcome(read_all(str(cut))) == [
        ("sample0", 0),
        ("sample1", INCOMPLETE),
        (None, "truncated tar after 3 members: unexpected end of data"),
    ]


def test_corrupt_header_in_the_middle(tmp_path: Path) -> None:
    full = make_shard(tmp_path / "full.tar", three_samples())
    damaged = bytearray(full.read_bytes())
    header = member_end_offsets(str(full))[3]  # the header of sample1.json
    damaged[header : header + 100] = b"x" * 100
    path = tmp_path / "damaged.tar"
    path.write_bytes(bytes(damaged))
    items = read_all(str(path))
    assert outcome(items)[:2] == [("sample0", 0), ("sample1", "corrupt tar: sample may be incomplete")]
    assert items[2][1].reason.startswith(f"corrupt tar after 4 members: corrupt header at byte {header} (")
    assert len(items) == 3


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "empty file, not a tar"),
        (b"just some text, certainly not a tar archive" * 30, "not a tar file: "),
        (gzip.compress(b"gzip'ed text, not a tar" * 30), "not a tar file: "),
    ],
)
def test_not_a_tar(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "bad.tar"
    path.write_bytes(content)
    items = read_all(str(path))
    assert len(items) == 1 and items[0][0] is None and items[0][1].reason.startswith(expected)


def test_missing_shard(tmp_path: Path) -> None:
    items = list(iter_samples(str(tmp_path / "nope.tar")))
    assert outcome(items) == [(None, f"shard not found: {tmp_path}/nope.tar")]
    assert scan_shard(str(tmp_path / "nope.tar")).error == f"shard not found: {tmp_path}/nope.tar"


# --- S3 ------------------------------------------------------------------------------------------------


def upload(bucket: str, name: str, content: bytes) -> str:
    Storage.from_url(f"s3://{bucket}/shards").put(name, content)
    return f"s3://{bucket}/shards/{name}"


def test_s3_shards(s3_bucket: str, tmp_path: Path) -> None:
    tar = make_shard(tmp_path / "val.tar", three_samples()).read_bytes()
    tgz = make_shard(tmp_path / "val.tar.gz", three_samples()).read_bytes()
    for url in (upload(s3_bucket, "val-0000.tar", tar), upload(s3_bucket, "val-0001.tar.gz", tgz)):
        assert outcome(read_all(url)) == [("sample0", 0), ("sample1", 1), ("sample2", 2)]
    truncated = upload(s3_bucket, "cut.tar", cut_inside_member(tmp_path / "val.tar", 6))
    assert outcome(read_all(truncated))[-2:] == [
        ("sample2", INCOMPLETE),
        (None, "truncated tar after 6 members: unexpected end of data"),
    ]
    assert outcome(read_all(upload(s3_bucket, "empty.tar", b""))) == [(None, "empty file, not a tar")]
    missing = f"s3://{s3_bucket}/shards/nope.tar"
    assert outcome(list(iter_samples(missing))) == [(None, f"shard not found: {missing}")]


def test_s3_scan_reads_headers_only(
    s3_bucket: str, s3_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    filler = bytes(1 << 20)
    samples = [(f"k{i}", {"jpg": jpeg_bytes(), "npy": filler, "cls": b"1"}) for i in range(8)]
    url = upload(s3_bucket, "big.tar", make_shard(tmp_path / "big.tar", samples).read_bytes())
    with S3Proxy(s3_server) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        assert scan_shard(url) == ShardScan([f"k{i}" for i in range(8)], None)
    assert proxy.bytes_served < 200_000  # of an 8 MiB shard


def test_s3_scan_of_small_members_takes_few_requests(
    s3_bucket: str, s3_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    samples = [
        (f"k{i}", {"jpg": jpeg_bytes(), "cls": b"1"}) for i in range(600)
    ]  # about 1 MiB of headers and small files
    url = upload(s3_bucket, "small.tar", make_shard(tmp_path / "small.tar", samples).read_bytes())
    with S3Proxy(s3_server) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        assert scan_shard(url) == ShardScan([f"k{i}" for i in range(600)], None)
        scanned = proxy.requests
        offsets = member_offsets(url)
    assert scanned < 10, f"{scanned} requests to scan 1,200 headers"  # 4 KiB per request would take hundreds
    assert sorted(offsets) == sorted(f"k{i}" for i in range(600)) and [name for name, *_ in offsets["k7"]] == [
        "k7.jpg",
        "k7.cls",
    ]


def formatted_tar(path: Path, tar_format: int, members: list[tuple[str | tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tar_format) as tar:
        for name, payload in members:
            info = name if isinstance(name, tarfile.TarInfo) else tarfile.TarInfo(name)
            info.size = len(payload) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(payload) if info.isreg() else None)
    return path


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize(
    "damage", ["none", "long name", "cut inside a member", "cut between members", "bad checksum", "no end marker"]
)
def test_member_offsets_read_plain_headers_quickly_and_agree_with_tarfile(
    tmp_path: Path, tar_format: int, damage: str
) -> None:
    """member_offsets reads plain headers itself (a fifth of tarfile's time) and hands anything else to
    tarfile: over tar formats, folders, links, empty and block-sized members, long names (a ustar prefix,
    a GNU long-name or a pax header) and damage, its answer is tarfile's."""
    folder, link = tarfile.TarInfo("d"), tarfile.TarInfo("d/link.jpg")
    folder.type, link.type, link.linkname = tarfile.DIRTYPE, tarfile.SYMTYPE, "a.jpg"
    members: list[tuple[str | tarfile.TarInfo, bytes]] = [
        ("a.jpg", jpeg_bytes()),
        ("a.cls", b"1"),
        (folder, b""),
        (link, b""),
        ("d/b.jpg", b"x" * 512),
        ("d/b.cls", b""),
        ("c.seg.png", png_bytes()),
        ("c.json", b"{}"),
    ]
    if damage == "long name":
        members.append(("deep/" * 30 + "e.jpg", b"y" * 700))  # 155 characters of folders: past a plain header's 100
    path = formatted_tar(tmp_path / "t.tar", tar_format, members)
    whole = path.read_bytes()
    ends = member_end_offsets(str(path))
    if damage == "cut inside a member":
        path.write_bytes(whole[: ends[0] + 512 + 100])
    elif damage == "cut between members":
        path.write_bytes(whole[: ends[4]])
    elif damage == "bad checksum":
        path.write_bytes(whole[: ends[1]] + b"x" * 100 + whole[ends[1] + 100 :])
    elif damage == "no end marker":
        path.write_bytes(whole[: ends[-1]] + b"\x01" + whole[ends[-1] + 1 :])

    with open(path, "rb") as reader:
        expected = member_index._tarfile_offsets(reader)
    with open(path, "rb") as reader:
        plain = member_index._plain_tar_offsets(reader)
    assert member_offsets(str(path)) == expected
    assert expected, "every case keeps some members"
    assert (plain is not None) == (damage == "none" or (damage == "long name" and tar_format == tarfile.USTAR_FORMAT))
    if plain is not None:
        assert plain == expected


def test_s3_indexed_sample_takes_one_request(
    s3_bucket: str, s3_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once its shard is indexed, a sample is one ranged read over its members (no HEAD, no read-ahead
    beyond it); a sample whose members lie far apart (a large member not decoded between them) is one
    read per decoded member, never the member in between."""
    filler = bytes(2 << 20)
    samples = [
        ("near", {"jpg": jpeg_bytes(), "cls": b"3", "json": b'{"a": 1}'}),
        ("far", {"cls": b"4", "npy": filler, "png": png_bytes()}),
    ]
    url = upload(s3_bucket, "mixed.tar", make_shard(tmp_path / "mixed.tar", samples).read_bytes())
    offsets = member_offsets(url)
    with S3Proxy(s3_server) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        near = member_index.read_sample(url, "near", offsets)
        assert proxy.requests == 1
        far = member_index.read_sample(url, "far", offsets)
        assert proxy.requests == 3 and proxy.bytes_served < 100_000
    assert isinstance(near, Sample) and near.label == 3 and near.meta == {"a": 1}
    assert isinstance(far, Sample) and far.label == 4 and far.image.size == Image.open(io.BytesIO(png_bytes())).size


def test_s3_unreadable_shard(s3_strict_auth: str) -> None:
    url = f"s3://{s3_strict_auth}/val.tar"
    [(index, error)] = list(iter_samples(url))
    assert index is None and error.reason == f"cannot read shard: cannot read {url}: access denied (HTTP 403 Forbidden)"
