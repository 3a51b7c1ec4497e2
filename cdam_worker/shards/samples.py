"""Samples out of a shard's key groups: the rules a sample must pass and the safe decoding of its members.

Only images, integer ``cls`` labels, ``json`` and ``txt`` members are decoded; nothing is ever unpickled.
Every bad sample becomes a :class:`SampleError` saying why, in one line.
"""

from __future__ import annotations

import io
import json
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cdam_worker.messages import one_line

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm", "pgm", "pnm")
LABEL_EXTENSIONS = ("cls", "cls2", "class", "label")
MAX_IMAGE_PIXELS = 89_478_485
"""Larger images are refused as decompression bombs (Pillow's default limit, enforced here explicitly)."""
MAX_MEMBER_BYTES = 256 << 20
"""Larger members are refused rather than read into memory."""
INT32_RANGE = (-(2**31), 2**31 - 1)
"""Labels must fit the int32 ``label`` column of the metadata."""

DECODED_EXTENSIONS = frozenset((*IMAGE_EXTENSIONS, *LABEL_EXTENSIONS, "json", "txt"))
"""Members of these extensions are read and decoded; others are skipped unread."""


def is_read(extension: str, size: int) -> bool:
    """Whether a member's bytes are read: an extension we decode, and no larger than ``MAX_MEMBER_BYTES``."""
    return extension in DECODED_EXTENSIONS and size <= MAX_MEMBER_BYTES


# Pillow formats we decode, whatever the extension says; everything else (EPS, which runs Ghostscript,
# and the rarer parsers) is refused.
_PIL_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "PPM")


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
class Member:
    """One regular-file member of a shard."""

    name: str
    extension: str
    size: int
    data: bytes | None  # None when not needed (an extension we ignore) or not read (a header scan)
    offset: int  # of its data in the (uncompressed) tar stream


@dataclass
class KeyGroup:
    """Consecutive members sharing a key: one sample, if it passes the rules."""

    key: str
    members: list[Member] = field(default_factory=list)
    cut_off: str | None = None  # why the tar ended or broke while this group was being read


class _Rejected(Exception):
    """A sample-level problem; its message becomes the SampleError reason."""


def decode_group(
    group: KeyGroup,
    index: int,
    seen: dict[str, int],
    require_label: bool,
    image_decoder: Callable[[bytes, str], Image.Image] | None = None,
) -> Sample | SampleError:
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
        return Sample(
            key=group.key,
            image=image,
            label=label,
            meta=meta,
            width=width,
            height=height,
            text=text,
            sample_json=sample_json,
        )
    except (_Rejected, ImageError) as rejected:
        return SampleError(group.key, str(rejected))


def _check_group(group: KeyGroup, index: int, first_index: int) -> None:
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
    decoded = [extension for extension in extensions if extension in DECODED_EXTENSIONS]
    if repeated := sorted({extension for extension in decoded if decoded.count(extension) > 1}):
        raise _Rejected(f"repeated member extension {', '.join(repeated)} (members: {', '.join(names)})")
    for member in group.members:
        if member.extension in DECODED_EXTENSIONS and member.size > MAX_MEMBER_BYTES:
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
                    f"{image.width}x{image.height} pixels exceed the limit of {MAX_IMAGE_PIXELS}"
                )
            image.load()
            image = ImageOps.exif_transpose(image)  # photographs: the upright image a viewer shows
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"decompression bomb: {name!r}: {one_line(exc)}") from None
    except UnidentifiedImageError:  # its message names the in-memory buffer, which is of no use
        raise ImageError(f"corrupt image {name!r}: cannot identify image file") from None
    except Exception as exc:  # Pillow raises many error types on bad input
        raise ImageError(f"corrupt image {name!r}: {one_line(exc)}") from None
    try:
        return to_rgb(image)
    except ValueError as exc:
        raise ImageError(f"cannot convert image {name!r} (mode {image.mode}) to RGB: {one_line(exc)}") from None


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


def _first_member(group: KeyGroup, extensions: Sequence[str]) -> Member | None:
    return next((m for extension in extensions for m in group.members if m.extension == extension), None)


def _decode_label(group: KeyGroup, require_label: bool) -> int | None:
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
        raise _Rejected(
            f"cls label {shown} in {member.name!r} does not fit the int32 label column "
            f"({INT32_RANGE[0]}..{INT32_RANGE[1]})"
        )
    return label


def _decode_meta(group: KeyGroup) -> tuple[dict | None, str | None]:
    """The json member as an object and as the string stored in ``sample_json``; (None, None) if absent."""
    member = _first_member(group, ("json",))
    if member is None:
        return None, None
    try:
        meta = json.loads(member.data or b"")
        stored = json.dumps(meta, sort_keys=True)  # ASCII (non-ASCII and lone surrogates are escaped)
    except (ValueError, RecursionError) as exc:  # also UnicodeDecodeError and over-long integers
        raise _Rejected(f"invalid json {member.name!r}: {one_line(exc)}") from None
    if not isinstance(meta, dict):
        raise _Rejected(f"invalid json {member.name!r}: expected an object, got {type(meta).__name__}")
    return meta, stored


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _decode_text(group: KeyGroup) -> str | None:
    member = _first_member(group, ("txt",))
    return None if member is None else (member.data or b"").decode("utf-8", errors="replace")
