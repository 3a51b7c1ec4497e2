"""Property-based tests of the input path (issue 12): whatever a shard holds, every sample of it is either
explained or in errors/, exactly once, and only a shard that cannot be read at all fails as a whole.

Shards are built from random member names (unicode, dots, slashes, very long, empty stems, bytes that
are not UTF-8), member orders and types, labels, json, text and image bytes (valid in many formats and
modes, truncated, bombs, other formats, noise), plain or gzip'ed, and then also mutated byte by byte.
They run in this process (no Ray) through the job's own ShardProcessor on a tiny model.

Seeded (``derandomize``: the examples depend only on the test's code, so a failure reproduces), with a
fixed number of examples and a deadline per example.
"""

from __future__ import annotations

import gzip
import io
import json
import struct
import tarfile
import zlib
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accounting import assert_every_sample_accounted, in_process_processor, process
from cdam_worker.shards.samples import INT32_RANGE, Sample, SampleError
from cdam_worker.shards.tar_reader import iter_samples, scan_shard
from helpers import gradient_image, image_bytes

FUZZ = dict(
    derandomize=True,
    database=None,
    deadline=timedelta(seconds=20),  # per example; a loaded 2-core CI machine is slow, a hang is not
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)


# --- what a shard may hold --------------------------------------------------------------------------------


def png_declaring(width: int, height: int) -> bytes:
    """A PNG header (signature and IHDR) declaring a size, without pixels: a decompression bomb if large."""
    body = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(body))
        + b"IHDR"
        + body
        + struct.pack(">I", zlib.crc32(b"IHDR" + body))
    )


VALID_IMAGES = [
    image_bytes(gradient_image(16, 12), "PNG"),
    image_bytes(gradient_image(1, 1), "PNG"),
    image_bytes(gradient_image(9, 5, "RGBA"), "PNG"),
    image_bytes(gradient_image(7, 7, "P"), "PNG"),
    image_bytes(gradient_image(6, 9, "I;16"), "PNG"),
    image_bytes(gradient_image(5, 4, "1"), "PNG"),
    image_bytes(gradient_image(16, 12), "JPEG", quality=80),
    image_bytes(gradient_image(8, 8, "CMYK"), "JPEG"),
    image_bytes(gradient_image(12, 16, "L"), "JPEG"),
    image_bytes(gradient_image(10, 10), "WEBP"),
    image_bytes(gradient_image(10, 10, "P"), "GIF"),
    image_bytes(gradient_image(10, 10), "BMP"),
    image_bytes(gradient_image(10, 10, "F"), "TIFF"),
    image_bytes(gradient_image(10, 10), "PPM"),
]
ODD_IMAGES = [
    image_bytes(gradient_image(10, 10), "ICO"),  # a format the job does not decode
    image_bytes(gradient_image(10, 10), "TGA"),
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",  # EPS would run Ghostscript: refused
    b"%PDF-1.4\n",
    png_declaring(20000, 20000),
    png_declaring(0, 7),
    png_declaring(2**31 - 1, 1),
    b"",
]

images = st.one_of(
    st.sampled_from(VALID_IMAGES),
    st.sampled_from(VALID_IMAGES),
    st.sampled_from(ODD_IMAGES),
    st.tuples(st.sampled_from(VALID_IMAGES), st.floats(0, 1)).map(
        lambda cut: cut[0][: int(len(cut[0]) * cut[1])]
    ),  # truncated
    st.binary(max_size=64),
)
labels = st.one_of(
    st.integers(-(2**40), 2**40).map(lambda n: str(n).encode()),
    st.sampled_from(
        [
            str(INT32_RANGE[0]).encode(),
            str(INT32_RANGE[1]).encode(),
            b"2147483648",
            b"-2147483649",
            b"99999999999999999999",
            b"9" * 5000,
            b"0x1f",
            b"1e3",
            b"7.0",
            b"",
            b"\xff\xfe",
            "\u0663".encode(),
        ]
    ),
    st.tuples(
        st.sampled_from(["", " ", "\n", "\t", "\u00a0"]), st.integers(-100, 100), st.sampled_from(["", " ", "\r\n"])
    ).map(lambda p: f"{p[0]}{p[1]}{p[2]}".encode()),
    st.text(max_size=12).map(lambda text: text.encode("utf-8", "surrogatepass")),
    st.binary(max_size=12),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.integers(min_value=10**30) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)
jsons = st.one_of(
    st.dictionaries(st.text(max_size=8), json_values, max_size=4).map(lambda value: json.dumps(value).encode()),
    st.sampled_from(
        [
            b"{",
            b"[1]",
            b"null",
            b'"text"',
            b'{"n": ' + b"9" * 5000 + b"}",
            b"[" * 50_000 + b"]" * 50_000,
            b'{"a": "caf\xe9"}',
            json.dumps({"a": "\u00e9"}).encode("utf-16"),
            b'{"a": "\\ud800"}',
            b'{"a": NaN, "b": -Infinity}',
            b'{"a": 1, "a": 2}',
            b"\xef\xbb\xbf{}",
        ]
    ),
    st.binary(max_size=32),
)
IMAGE_EXTENSIONS = ["jpg", "png", "webp", "gif", "tiff", "bmp", "JPG", "seg.png"]
LABEL_EXTENSIONS = ["cls", "cls", "cls2"]
OTHER_EXTENSIONS = ["txt", "pyd", "\u00fc.x", "json.gz"]

odd_keys = st.one_of(
    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12),
    st.text("ab./", max_size=8),  # dots and slashes: folders, empty stems, keys split by a dot
    st.text("xyz", min_size=150, max_size=300),  # longer than a plain tar header holds
    st.sampled_from(["", "a/", "a/b", "../up", "/abs/x", "v1.2/x", "\u00fc/\u00f6", "a\nb", "a\\b", " "]),
    st.binary(min_size=1, max_size=6).map(lambda raw: raw.decode("utf-8", "surrogateescape")),  # not UTF-8
)


@st.composite
def sample_members(draw: st.DrawFn, key: str) -> list[tuple[str, bytes | str]]:
    """One sample's members, in any order: usually an image, often a label and json, sometimes other files."""
    chosen = []
    if draw(st.integers(0, 9)) > 0:
        chosen.append((f"{key}.{draw(st.sampled_from(IMAGE_EXTENSIONS))}", draw(images)))
    if draw(st.booleans()):
        chosen.append((f"{key}.{draw(st.sampled_from(LABEL_EXTENSIONS))}", draw(labels)))
    if draw(st.booleans()):
        chosen.append((f"{key}.json", draw(jsons)))
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from(["file", "file", "dir", "link", "bare"]))
        name = {"file": f"{key}.{draw(st.sampled_from(OTHER_EXTENSIONS))}", "bare": key}.get(kind, f"{key}.{kind}")
        chosen.append((name, kind if kind in ("dir", "link") else draw(st.binary(max_size=32))))
    return draw(st.permutations(chosen))


@st.composite
def members(draw: st.DrawFn) -> list[tuple[str, bytes | str]]:
    """A shard's members in tar order: samples under plain or odd keys, now and then interleaved or
    repeated, with folders and links among them."""
    chosen = []
    for i in range(draw(st.integers(1, 8))):
        key = draw(odd_keys) if draw(st.integers(0, 5)) == 0 else f"img{i}"
        chosen += draw(sample_members(key))
    if len(chosen) > 1 and draw(st.integers(0, 3)) == 0:  # swap two members: interleaved samples, repeated keys
        i, j = draw(st.integers(0, len(chosen) - 1)), draw(st.integers(0, len(chosen) - 1))
        chosen[i], chosen[j] = chosen[j], chosen[i]
    return chosen


def write_shard(path: Path, chosen: list[tuple[str, bytes | str]], tar_format: int, compressed: bool) -> str:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tar_format, encoding="utf-8", errors="surrogateescape") as tar:
        for name, data in chosen:
            info = tarfile.TarInfo(name)
            if data == "dir":
                info.type = tarfile.DIRTYPE
            elif data == "link":
                info.type, info.linkname = tarfile.SYMTYPE, "elsewhere.jpg"
            else:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    payload = buffer.getvalue()
    path.write_bytes(gzip.compress(payload, mtime=0) if compressed else payload)
    return str(path)


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    """``base`` with a few byte-level mutations: bytes overwritten, a run deleted or inserted, the end cut."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.integers(0, max(len(data) - 1, 0)))
        action = draw(st.sampled_from(["set", "set", "delete", "insert", "cut"]))
        if action == "set" and data:
            data[where] = draw(st.integers(0, 255))
        elif action == "delete":
            del data[where : where + draw(st.integers(1, 600))]
        elif action == "insert":
            data[where:where] = draw(st.binary(min_size=1, max_size=600))
        elif action == "cut":
            del data[where:]
    return bytes(data)


def base_shard(compressed: bool) -> bytes:
    """A valid shard of five samples (png, cls, json, txt): the seed of the mutation tests."""
    chosen = []
    for i in range(5):
        chosen += [
            (f"s/{i:03d}.png", VALID_IMAGES[i % 4]),
            (f"s/{i:03d}.cls", str(i).encode()),
            (f"s/{i:03d}.json", b'{"i": %d}' % i),
            (f"s/{i:03d}.txt", b"caption"),
        ]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in chosen:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(buffer.getvalue(), mtime=0) if compressed else buffer.getvalue()


PLAIN, GZIPPED = base_shard(False), base_shard(True)


# --- properties -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def processors(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("fuzz")
    return {targets: in_process_processor(root / targets.replace(":", "-"), targets) for targets in ("topk:2", "label")}


@settings(**FUZZ, max_examples=150)
@given(
    chosen=members(),
    tar_format=st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT]),
    compressed=st.booleans(),
    targets=st.sampled_from(["topk:2", "label"]),
)
def test_every_sample_of_any_shard_is_explained_or_an_error_exactly_once(
    processors, tmp_path_factory, chosen, tar_format, compressed, targets
):
    processor = processors[targets]
    shard = write_shard(
        tmp_path_factory.getbasetemp() / ("fuzz.tar.gz" if compressed else "fuzz.tar"), chosen, tar_format, compressed
    )
    keys, summary = process(processor, shard)
    metadata, errors = assert_every_sample_accounted(processor, keys, summary)
    assert not [row for row in errors if row["key"] is None], "a shard written whole has no shard-level problem"
    for row in metadata:  # what was explained holds storable values (the schema took them) within range
        assert row["label"] is None or (targets == "topk:2" or 0 <= row["label"] < 6)


@settings(**FUZZ, max_examples=120)
@given(data=st.data(), compressed=st.booleans())
def test_every_sample_of_a_damaged_shard_is_explained_or_an_error_exactly_once(
    processors, tmp_path_factory, data, compressed
):
    processor = processors["topk:2"]
    shard = tmp_path_factory.getbasetemp() / ("mutated.tar.gz" if compressed else "mutated.tar")
    shard.write_bytes(data.draw(mutated(GZIPPED if compressed else PLAIN)))
    keys, summary = process(processor, str(shard))
    assert_every_sample_accounted(processor, keys, summary)


@settings(**FUZZ, max_examples=400)
@given(data=st.data(), compressed=st.booleans())
def test_reading_a_damaged_shard_yields_each_scanned_sample_once_in_order(tmp_path_factory, data, compressed):
    shard = tmp_path_factory.getbasetemp() / ("read.tar.gz" if compressed else "read.tar")
    shard.write_bytes(data.draw(mutated(GZIPPED if compressed else PLAIN)))
    scan = scan_shard(str(shard))
    items = list(iter_samples(str(shard)))
    indices = [index for index, _ in items if index is not None]
    assert indices == list(range(len(scan.keys)))
    assert [index for index, _ in items[len(indices) :]] in ([], [None])  # at most one shard-level problem, last
    assert (items[-1][0] is None) == (scan.error is not None) if items else scan.error is not None or scan.keys == []
    for index, item in items:
        assert item.reason.strip() if isinstance(item, SampleError) else isinstance(item, Sample)
        if index is not None:
            assert item.key == scan.keys[index]
