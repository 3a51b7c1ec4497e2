"""WebDataset shards in (local or S3, plain or gzip'ed tars), safely decoded samples out.

Members sharing a key form a sample: the key is the member path up to the first dot of its basename and the
extension is the rest, compared lower-case. Consecutive members with the same key form one *group*;
:func:`scan_shard` and :func:`iter_samples` number groups identically.

Only images, integer ``cls`` labels, ``json`` and ``txt`` members are decoded; nothing is ever unpickled
and member paths never touch the filesystem. Every bad sample becomes a :class:`SampleError` while the rest
of the shard is still read; problems with the shard itself (truncation, not a tar) come last, with key None.
"""

from __future__ import annotations

import fnmatch
import glob
import io
import json
import lzma
import os
import posixpath
import re
import tarfile
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
from braceexpand import braceexpand
from PIL import Image, ImageOps, UnidentifiedImageError

from cdam_worker.storage import Storage, StorageError, split_url

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm", "pgm", "pnm")
LABEL_EXTENSIONS = ("cls", "cls2", "class", "label")
MAX_IMAGE_PIXELS = 89_478_485
"""Larger images are refused as decompression bombs (Pillow's default limit, enforced here explicitly)."""
MAX_MEMBER_BYTES = 256 << 20
"""Larger members are refused rather than read into memory."""
INT32_RANGE = (-(2**31), 2**31 - 1)
"""Labels must fit the int32 ``label`` column of the metadata."""

_DECODED_EXTENSIONS = frozenset((*IMAGE_EXTENSIONS, *LABEL_EXTENSIONS, "json", "txt"))
# Pillow formats we decode, whatever the extension says; everything else (EPS, which runs Ghostscript,
# and the rarer parsers) is refused.
_PIL_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "PPM")
_TAR_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tar")
_COMPRESSION_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")
# What reading a broken or unreadable tar raises (the decompressors raise their own errors).
_READ_ERRORS = (tarfile.TarError, StorageError, OSError, EOFError, zlib.error, lzma.LZMAError)
_GLOB_CHARACTERS = re.compile(r"[*?\[]")


class DataError(ValueError):
    """Shard specs that cannot be resolved; the message names the spec."""


@dataclass
class Sample:
    """One decoded sample: an RGB image, its optional label (cls), metadata (json) and text (txt).

    Every value fits the column it is stored in: ``key`` and ``sample_json`` (the json member as stored,
    ``json.dumps(meta, sort_keys=True)``) encode as UTF-8, ``label``, ``width`` and ``height`` fit int32.
    """

    key: str
    image: Image.Image
    label: int | None
    meta: dict | None
    width: int
    height: int
    text: str | None = None
    sample_json: str | None = None


@dataclass
class SampleError:
    """A sample (or, with key None, a shard) that could not be read; ``reason`` is one line."""

    key: str | None
    reason: str


@dataclass
class ShardScan:
    """The key of every group of a shard in tar order, and why the scan stopped early (None if it did not)."""

    keys: list[str]
    error: str | None


def expand_shard_specs(specs: Sequence[str]) -> list[str]:
    """Absolute local paths and s3:// URLs of the shards named by paths, globs and brace patterns.

    Brace patterns ('val-{0000..0063}.tar') expand first; globs ('*', '?', '[..]', never crossing '/') are
    listed and sorted. Order of specs is kept and duplicates are dropped. A spec matching nothing, or a
    literal path that does not exist, raises DataError.
    """
    listings: dict[str, list[str]] = {}
    shards: list[str] = []
    for spec in specs:
        matched: list[str] = []
        missing: list[str] = []
        for pattern in braceexpand(spec):
            found = _expand_pattern(pattern, listings)
            if not found and not _GLOB_CHARACTERS.search(pattern):
                missing.append(pattern)
            matched.extend(found)
        if not matched:
            raise DataError(f"shard spec {spec!r} matches no file")
        if missing:
            raise DataError(f"shard {missing[0]!r} (from spec {spec!r}) does not exist")
        shards.extend(matched)
    return list(dict.fromkeys(shards))


def shard_name(url: str) -> str:
    """The shard's file name without its tar suffix: 's3://b/val-0003.tar' -> 'val-0003'."""
    name = url.rstrip("/").rsplit("/", 1)[-1]
    for suffix in _TAR_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def scan_shard(url: str) -> ShardScan:
    """Group keys of a shard from its member headers alone (data is skipped by seeking, also on S3).

    Compressed tars cannot be seeked, so those are decompressed in a stream.
    """
    keys: list[str] = []
    try:
        with _open_shard(url, scan=True) as probe:
            compressed = _compressed(probe)
            if not compressed:
                keys.extend(group.key for group in _read_groups(probe, "r:", read_data=False))
        if compressed:
            with _open_shard(url) as reader:
                keys.extend(group.key for group in _read_groups(reader, "r|*", read_data=False))
    except _ShardProblem as problem:
        return ShardScan(keys, str(problem))
    return ShardScan(keys, None)


def iter_samples(url: str, *, require_label: bool = False) -> Iterator[tuple[int | None, Sample | SampleError]]:
    """Stream a shard's samples as (group index, Sample or SampleError), in tar order.

    The group index matches ``scan_shard(url).keys``; shard-level problems come last with index None.
    When a tar ends or breaks inside a sample, that sample is reported as possibly incomplete. Only one
    member group is held in memory at a time.
    """
    seen: dict[str, int] = {}
    try:
        with _open_shard(url) as reader:
            for index, group in enumerate(_read_groups(reader, "r|*", read_data=True)):
                yield index, _decode_group(group, index, seen, require_label)
    except _ShardProblem as problem:
        yield None, SampleError(None, str(problem))


# --- shard specs -------------------------------------------------------------------------------------


def _expand_pattern(pattern: str, listings: dict[str, list[str]]) -> list[str]:
    """Shards matching one brace-free pattern: the file itself, or the sorted glob matches."""
    if pattern.startswith("s3://"):
        return _expand_s3_pattern(pattern, listings)
    if pattern.startswith("file://"):
        pattern = pattern[len("file://"):]
    pattern = os.path.abspath(os.path.expanduser(pattern))
    if _GLOB_CHARACTERS.search(pattern):
        return sorted(path for path in glob.glob(pattern) if os.path.isfile(path))
    return [pattern] if os.path.isfile(pattern) else []


def _expand_s3_pattern(pattern: str, listings: dict[str, list[str]]) -> list[str]:
    """S3 objects matching ``pattern``, listing each folder before the first wildcard once."""
    bucket, _, key = pattern[len("s3://"):].partition("/")
    parts = key.split("/")
    fixed = next((i for i, part in enumerate(parts) if _GLOB_CHARACTERS.search(part)), len(parts) - 1)
    folder = f"s3://{bucket}/" + "/".join(parts[:fixed])
    if folder not in listings:
        try:
            listings[folder] = Storage.from_url(folder).list()
        except StorageError as exc:
            raise DataError(f"cannot list shards for {pattern!r}: {exc}") from None
    wanted = "/".join(parts[fixed:])
    depth = wanted.count("/")  # '*' never crosses '/': the match must be exactly as deep
    return [f"{folder.rstrip('/')}/{path}" for path in listings[folder]
            if path.count("/") == depth and fnmatch.fnmatchcase(path, wanted)]


# --- reading tars ------------------------------------------------------------------------------------


class _ShardProblem(Exception):
    """A shard-level problem; its message becomes the reason of the final SampleError."""


@dataclass
class _Member:
    name: str
    extension: str
    size: int
    data: bytes | None  # None when not needed (an extension we ignore) or not read (a header scan)
    offset: int  # of its data in the (uncompressed) tar stream


@dataclass
class _Group:
    key: str
    members: list[_Member] = field(default_factory=list)
    cut_off: str | None = None  # why the tar ended or broke while this group was being read


class _BadHeader(tarfile.ReadError):
    """A member header after the first is missing, cut short or corrupt (all members before it are whole)."""


class _StrictTarInfo(tarfile.TarInfo):
    """TarInfo that refuses an archive ending without its end-of-archive marker.

    After the first member, tarfile treats a missing, truncated or corrupt header as a silent end of the
    archive; this raises _BadHeader instead, so truncated shards are noticed.
    """

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError):  # type: ignore[attr-defined]
            if tar.offset == 0:
                raise
            raise _BadHeader("unexpected end of data") from None
        except tarfile.InvalidHeaderError as exc:  # type: ignore[attr-defined]
            if tar.offset == 0:
                raise
            raise _BadHeader(f"corrupt header at byte {tar.offset} ({exc})") from None


def _open_shard(url: str, scan: bool = False) -> BinaryIO:
    """A reader for the shard at ``url`` (``scan``: one for jumping from header to header); _ShardProblem if
    it is missing, unreadable or empty."""
    try:
        storage, name = split_url(url)
        if storage.size(name) == 0:
            raise _ShardProblem("empty file, not a tar")
        return storage.open_scanner(name) if scan else storage.open_reader(name)
    except FileNotFoundError:
        raise _ShardProblem(f"shard not found: {url}") from None
    except StorageError as exc:
        raise _ShardProblem(f"cannot read shard: {exc}") from None


def _compressed(reader: BinaryIO) -> bool:
    """Whether the shard ``reader`` reads (from its start) is gzip, bzip2 or xz compressed; leaves it at its start."""
    magic = reader.read(6)
    reader.seek(0)
    return magic.startswith(_COMPRESSION_MAGIC)


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset (key, extension) of a member path: 'a/b.seg.png' -> ('a/b', 'seg.png')."""
    folder, base = posixpath.split(name)
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def _read_groups(reader: BinaryIO, mode: str, *, read_data: bool) -> Iterator[_Group]:
    """Key groups of regular-file members in tar order (links, folders and devices are skipped).

    On truncation or corruption the group in progress is yielded with ``cut_off`` set (members of it may be
    missing), then _ShardProblem is raised. ``mode`` is 'r:' (seek over member data) or 'r|*' (stream).
    """
    started = complete = 0  # tarfile checks that a member is whole when it moves on to the next one
    group: _Group | None = None
    try:
        tar = tarfile.open(fileobj=reader, mode=mode, tarinfo=_StrictTarInfo)
    except _READ_ERRORS as exc:
        raise _ShardProblem(f"not a tar file: {_one_line(exc)}") from None
    except TypeError:  # tarfile's gzip reader calls ord() on a byte of the header that is not there
        raise _ShardProblem("not a tar file: truncated gzip header") from None
    try:
        with tar:
            while (info := tar.next()) is not None:
                complete, started = started, started + 1
                tar.members.clear()  # tarfile keeps every header it reads; we never look back
                if info.isreg():
                    key, extension = split_member_name(info.name)
                    if group is None or group.key != key:
                        if group is not None:
                            yield group
                        group = _Group(key)
                    wanted = read_data and extension in _DECODED_EXTENSIONS and info.size <= MAX_MEMBER_BYTES
                    data = tar.extractfile(info).read() if wanted else None  # type: ignore[union-attr]
                    group.members.append(_Member(info.name, extension, info.size, data, info.offset_data))
    except _READ_ERRORS as exc:
        if isinstance(exc, _BadHeader):
            complete = started
        reason = _one_line(exc)
        if isinstance(exc, (StorageError, FileNotFoundError)):
            problem, message = "unreadable shard", f"cannot read shard after {complete} members: {reason}"
        else:
            problem = "truncated tar" if "unexpected end of data" in reason else "corrupt tar"
            message = f"{problem} after {complete} members: {reason}"
        if group is not None:
            group.cut_off = problem
            yield group
        raise _ShardProblem(message) from None
    if group is not None:
        yield group


# --- decoding ----------------------------------------------------------------------------------------


class _Rejected(Exception):
    """A sample-level problem; its message becomes the SampleError reason."""


def _decode_group(group: _Group, index: int, seen: dict[str, int], require_label: bool, image_decoder: Callable[[bytes, str], Image.Image] | None = None) -> Sample | SampleError:
    """The Sample of one key group, or the SampleError saying why there is none.

    ``image_decoder`` replaces :func:`decode_image` (the GPU decode path only reads a JPEG's header here).
    """
    first = seen.setdefault(group.key, index)
    try:
        _check_group(group, index, first)
        label, (meta, sample_json), text = _decode_label(group, require_label), _decode_meta(group), _decode_text(group)
        image_member = _first_member(group, IMAGE_EXTENSIONS)
        if image_member is None:
            raise _Rejected(f"no image member (members: {', '.join(member.name for member in group.members)})")
        image = (image_decoder or decode_image)(image_member.data or b"", image_member.name)
        width, height = image.size
        return Sample(key=group.key, image=image, label=label, meta=meta, width=width, height=height, text=text, sample_json=sample_json)
    except (_Rejected, ImageError) as rejected:
        return SampleError(group.key, str(rejected))


def _check_group(group: _Group, index: int, first_index: int) -> None:
    """Refuse unsafe paths, cut-off or duplicate samples, and repeated or oversized members."""
    names = [member.name for member in group.members]
    for name in names:
        if name.startswith("/") or ".." in name.split("/"):
            raise _Rejected(f"unsafe member path {name!r}")
    if not _is_utf8(group.key):  # tarfile keeps undecodable name bytes as lone surrogates
        raise _Rejected(f"member name {names[0]!r} is not valid UTF-8, so its key cannot be stored")
    if group.cut_off:
        raise _Rejected(f"{group.cut_off}: sample may be incomplete")
    if first_index != index:
        raise _Rejected(f"duplicate key {group.key!r} (first seen at sample {first_index})")
    extensions = [member.extension for member in group.members]
    decoded = [extension for extension in extensions if extension in _DECODED_EXTENSIONS]
    if repeated := sorted({extension for extension in decoded if decoded.count(extension) > 1}):
        raise _Rejected(f"repeated member extension {', '.join(repeated)} (members: {', '.join(names)})")
    for member in group.members:
        if member.extension in _DECODED_EXTENSIONS and member.size > MAX_MEMBER_BYTES:
            raise _Rejected(f"member {member.name!r} is too large ({member.size} bytes)")


class ImageError(ValueError):
    """An image that cannot be decoded safely: corrupt, a decompression bomb, or not convertible to RGB."""


def decode_image(data: bytes, name: str) -> Image.Image:
    """Decode the image file ``data`` (named ``name`` in errors): upright (EXIF orientation applied), 8-bit RGB."""
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its limit; refuse those too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=_PIL_FORMATS)
            # Checked here as well: Pillow's limit is a global others may change, and warning filters are
            # process-wide, so another thread's catch_warnings may undo ours.
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError(
                    f"{image.width}x{image.height} pixels exceed the limit of {MAX_IMAGE_PIXELS}")
            image.load()
            image = ImageOps.exif_transpose(image)  # photographs: the upright image a viewer shows
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"decompression bomb: {name!r}: {_one_line(exc)}") from None
    except UnidentifiedImageError:  # its message names the in-memory buffer, which is of no use
        raise ImageError(f"corrupt image {name!r}: cannot identify image file") from None
    except Exception as exc:  # Pillow raises many error types on bad input
        raise ImageError(f"corrupt image {name!r}: {_one_line(exc)}") from None
    try:
        return to_rgb(image)
    except ValueError as exc:
        raise ImageError(f"cannot convert image {name!r} (mode {image.mode}) to RGB: {_one_line(exc)}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow image to 8-bit RGB.

    Transparency is composited over white. 16-bit and 32-bit integer images are scaled from 0..65535 to
    0..255; float images are scaled from 0..1 when they lie in it, kept when they lie in 0..255 and
    otherwise stretched linearly from their range (extended to include 0) onto 0..255.
    """
    if image.mode.startswith("I") or image.mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(image))).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Grey levels of a 16/32-bit integer or float image scaled to uint8 (see :func:`to_rgb`)."""
    if pixels.dtype.kind in "iu":
        return np.rint(np.clip(pixels, 0, 65535) / 257.0).astype(np.uint8)
    pixels = np.nan_to_num(pixels.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(pixels.min(initial=0.0)), float(pixels.max(initial=0.0))
    if low >= 0.0 and high <= 1.0:
        pixels = pixels * 255.0
    elif low < 0.0 or high > 255.0:
        pixels = (pixels - low) * (255.0 / (high - low))  # low <= 0 <= high, so high > low here
    return np.rint(pixels).astype(np.uint8)


def _first_member(group: _Group, extensions: Sequence[str]) -> _Member | None:
    return next((m for extension in extensions for m in group.members if m.extension == extension), None)


def _decode_label(group: _Group, require_label: bool) -> int | None:
    member = _first_member(group, LABEL_EXTENSIONS)
    if member is None:
        if require_label:
            raise _Rejected("missing cls label")
        return None
    text = (member.data or b"").decode("utf-8", errors="replace").strip()
    if not re.fullmatch(r"[+-]?[0-9]+", text):
        raise _Rejected(f"non-integer cls {member.name!r}: {text[:40]!r}")
    digits = text.lstrip("+-").lstrip("0")
    label = int(text) if len(digits) <= 10 else None  # int() refuses more than 4300 digits
    if label is None or not INT32_RANGE[0] <= label <= INT32_RANGE[1]:
        shown = text if len(text) <= 40 else f"{text[:20]}... ({len(digits)} digits)"
        raise _Rejected(f"cls label {shown} in {member.name!r} does not fit the int32 label column "
                        f"({INT32_RANGE[0]}..{INT32_RANGE[1]})")
    return label


def _decode_meta(group: _Group) -> tuple[dict | None, str | None]:
    """The json member as an object and as the string stored in ``sample_json``; (None, None) if absent."""
    member = _first_member(group, ("json",))
    if member is None:
        return None, None
    try:
        meta = json.loads(member.data or b"")
        stored = json.dumps(meta, sort_keys=True)  # ASCII (non-ASCII and lone surrogates are escaped)
    except (ValueError, RecursionError) as exc:  # also UnicodeDecodeError and over-long integers
        raise _Rejected(f"invalid json {member.name!r}: {_one_line(exc)}") from None
    if not isinstance(meta, dict):
        raise _Rejected(f"invalid json {member.name!r}: expected an object, got {type(meta).__name__}")
    return meta, stored


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _decode_text(group: _Group) -> str | None:
    member = _first_member(group, ("txt",))
    return None if member is None else (member.data or b"").decode("utf-8", errors="replace")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


# --- one sample by key (the reading side: ``Run.image``) ----------------------------------------------

SAMPLE_SPAN_SLACK = 1 << 20
"""A sample's members are read in one request when what lies between them (headers, members not decoded)
is at most this much; otherwise one request each."""


def _read_members(url: str, wanted: list[tuple[int, int]]) -> dict[int, bytes]:
    """The bytes of each (offset, size) of the shard at ``url``, by offset: one ranged read across them
    where they lie together (a sample's members in a tar), else one each."""
    if not wanted:
        return {}
    storage, name = split_url(url)
    start, end = min(offset for offset, _ in wanted), max(offset + size for offset, size in wanted)
    if end - start <= sum(size for _, size in wanted) + SAMPLE_SPAN_SLACK:
        span = storage.read_range(name, start, end - start)
        return {offset: bytes(span[offset - start : offset - start + size]) for offset, size in wanted}
    return {offset: bytes(storage.read_range(name, offset, size)) for offset, size in wanted}


def member_offsets(url: str) -> dict[str, list[tuple[str, int, int]]] | None:
    """key -> [(member name, data offset, size)] of an uncompressed tar, from its headers alone (seeking,
    also on S3); None for a compressed tar, which cannot be read at an offset, or a shard that cannot be opened."""
    try:
        with _open_shard(url, scan=True) as reader:
            if _compressed(reader):
                return None
            offsets = _plain_tar_offsets(reader)
            if offsets is None:  # something tarfile must judge: it reads the whole tar again
                reader.seek(0)
                offsets = _tarfile_offsets(reader)
    except _ShardProblem:
        return None  # missing or unreadable: read_sample's streaming path says what is wrong with it
    return offsets


_PLAIN_TYPES = frozenset((b"0", b"\0", b"7", b"1", b"2", b"3", b"4", b"5", b"6"))
"""Header types of files, links, folders and devices: no pax or GNU headers that change the next member."""


def _plain_tar_offsets(reader: BinaryIO) -> dict[str, list[tuple[str, int, int]]] | None:
    """:func:`member_offsets` of a tar whose headers are all plain (ustar or GNU, no pax or long-name
    headers, the usual WebDataset shard) and that ends with its end-of-archive marker: tarfile's answer,
    from the few header fields it needs, in a fifth of the time. None at anything else (such a header, a
    checksum it must judge, a header cut short or missing), where tarfile decides."""
    offsets: dict[str, list[tuple[str, int, int]]] = {}
    offset = 0
    try:
        while True:
            reader.seek(offset)
            block = reader.read(tarfile.BLOCKSIZE)
            if len(block) != tarfile.BLOCKSIZE:
                return None
            if block.count(0) == tarfile.BLOCKSIZE:
                return offsets  # the end-of-archive marker
            kind = block[156:157]
            if kind not in _PLAIN_TYPES or tarfile.nti(block[148:156]) != sum(block) - sum(block[148:156]) + 256:
                return None
            name = tarfile.nts(block[0:100], tarfile.ENCODING, "surrogateescape")
            regular = kind in (b"0", b"7") or (kind == b"\0" and not name.endswith("/"))
            if prefix := tarfile.nts(block[345:500], tarfile.ENCODING, "surrogateescape"):
                name = f"{prefix}/{name}"
            offset += tarfile.BLOCKSIZE
            if regular:
                size = tarfile.nti(block[124:136])
                offsets.setdefault(split_member_name(name)[0], []).append((name, offset, size))
                offset += -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    except _READ_ERRORS:
        return None


def _tarfile_offsets(reader: BinaryIO) -> dict[str, list[tuple[str, int, int]]]:
    """:func:`member_offsets` by tarfile, for any tar: up to the first broken header, if there is one."""
    offsets: dict[str, list[tuple[str, int, int]]] = {}
    try:
        with tarfile.open(fileobj=reader, mode="r:", tarinfo=_StrictTarInfo) as tar:
            while (info := tar.next()) is not None:
                tar.members.clear()
                if info.isreg():
                    key, _ = split_member_name(info.name)
                    offsets.setdefault(key, []).append((info.name, info.offset_data, info.size))
    except _READ_ERRORS:
        pass  # what was indexed before a broken header is still readable
    return offsets


def read_sample(url: str, key: str, offsets: dict[str, list[tuple[str, int, int]]] | None = None) -> Sample | SampleError:
    """The sample ``key`` of the shard at ``url``, decoded exactly as the job decodes it.

    With ``offsets`` (:func:`member_offsets`), only that sample's members are read; without, the shard is
    streamed up to the sample.
    """
    if offsets is not None:
        if key not in offsets:
            return SampleError(key, f"no sample {key!r} in {url}")
        members = [(member, split_member_name(member)[1], offset, size) for member, offset, size in offsets[key]]
        wanted = [(offset, size) for _, extension, offset, size in members if extension in _DECODED_EXTENSIONS and size <= MAX_MEMBER_BYTES]
        try:
            data = _read_members(url, wanted)
        except (StorageError, OSError) as exc:
            return SampleError(key, f"cannot read shard {url}: {_one_line(exc)}")
        group = _Group(key, [_Member(member, extension, size, data.get(offset), offset) for member, extension, offset, size in members])
        return _decode_group(group, 0, {}, require_label=False)
    try:
        with _open_shard(url) as reader:
            for group in _read_groups(reader, "r|*", read_data=True):
                if group.key == key:
                    return _decode_group(group, 0, {}, require_label=False)
    except _ShardProblem as problem:
        return SampleError(key, str(problem))
    return SampleError(key, f"no sample {key!r} in {url}")
