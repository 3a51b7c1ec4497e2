"""Reading WebDataset shards (local or S3, plain or compressed tars) as key groups, and samples out of them.

Members sharing a key form a sample: the key is the member path up to the first dot of its basename and the
extension is the rest, compared lower-case. Consecutive members with the same key form one *group*;
:func:`scan_shard` and :func:`iter_samples` number groups identically. Member paths never touch the
filesystem. Problems with the shard itself (truncation, not a tar) come last, with key None.
"""

from __future__ import annotations

import lzma
import posixpath
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from cdam_worker.messages import one_line
from cdam_worker.shards.samples import KeyGroup, Member, Sample, SampleError, decode_group, is_read
from cdam_worker.storage import StorageError, split_url

_COMPRESSION_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")
READ_ERRORS = (tarfile.TarError, StorageError, OSError, EOFError, zlib.error, lzma.LZMAError)
"""What reading a broken or unreadable tar raises (the decompressors raise their own errors)."""


@dataclass
class ShardScan:
    """The key of every group of a shard in tar order, and why the scan stopped early (None if it did not)."""

    keys: list[str]
    error: str | None


def scan_shard(url: str) -> ShardScan:
    """Group keys of a shard from its member headers alone (data is skipped by seeking, also on S3).

    Compressed tars cannot be seeked, so those are decompressed in a stream.
    """
    keys: list[str] = []
    try:
        with open_shard(url, scan=True) as probe:
            compressed = is_compressed(probe)
            if not compressed:
                keys.extend(group.key for group in read_groups(probe, "r:", read_data=False))
        if compressed:
            with open_shard(url) as reader:
                keys.extend(group.key for group in read_groups(reader, "r|*", read_data=False))
    except ShardProblem as problem:
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
        with open_shard(url) as reader:
            for index, group in enumerate(read_groups(reader, "r|*", read_data=True)):
                yield index, decode_group(group, index, seen, require_label)
    except ShardProblem as problem:
        yield None, SampleError(None, str(problem))


class ShardProblem(Exception):
    """A shard-level problem; its message becomes the reason of the final SampleError."""


class _BadHeader(tarfile.ReadError):
    """A member header after the first is missing, cut short or corrupt (all members before it are whole)."""


class StrictTarInfo(tarfile.TarInfo):
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


def open_shard(url: str, scan: bool = False) -> BinaryIO:
    """A reader for the shard at ``url`` (``scan``: one for jumping from header to header); ShardProblem if
    it is missing, unreadable or empty."""
    try:
        storage, name = split_url(url)
        if storage.size(name) == 0:
            raise ShardProblem("empty file, not a tar")
        return storage.open_scanner(name) if scan else storage.open_reader(name)
    except FileNotFoundError:
        raise ShardProblem(f"shard not found: {url}") from None
    except StorageError as exc:
        raise ShardProblem(f"cannot read shard: {exc}") from None


def is_compressed(reader: BinaryIO) -> bool:
    """Whether the shard ``reader`` reads (from its start) is gzip, bzip2 or xz compressed; leaves it at its start."""
    magic = reader.read(6)
    reader.seek(0)
    return magic.startswith(_COMPRESSION_MAGIC)


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset (key, extension) of a member path: 'a/b.seg.png' -> ('a/b', 'seg.png')."""
    folder, base = posixpath.split(name)
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def read_groups(reader: BinaryIO, mode: str, *, read_data: bool) -> Iterator[KeyGroup]:
    """Key groups of regular-file members in tar order (links, folders and devices are skipped).

    On truncation or corruption the group in progress is yielded with ``cut_off`` set (members of it may be
    missing), then ShardProblem is raised. ``mode`` is 'r:' (seek over member data) or 'r|*' (stream).
    """
    started = complete = 0  # tarfile checks that a member is whole when it moves on to the next one
    group: KeyGroup | None = None
    try:
        tar = tarfile.open(fileobj=reader, mode=mode, tarinfo=StrictTarInfo)
    except READ_ERRORS as exc:
        raise ShardProblem(f"not a tar file: {one_line(exc)}") from None
    except TypeError:  # tarfile's gzip reader calls ord() on a byte of the header that is not there
        raise ShardProblem("not a tar file: truncated gzip header") from None
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
                        group = KeyGroup(key)
                    wanted = read_data and is_read(extension, info.size)
                    data = tar.extractfile(info).read() if wanted else None  # type: ignore[union-attr]
                    group.members.append(Member(info.name, extension, info.size, data, info.offset_data))
    except READ_ERRORS as exc:
        if isinstance(exc, _BadHeader):
            complete = started
        reason = one_line(exc)
        if isinstance(exc, (StorageError, FileNotFoundError)):
            problem, message = "unreadable shard", f"cannot read shard after {complete} members: {reason}"
        else:
            problem = "truncated tar" if "unexpected end of data" in reason else "corrupt tar"
            message = f"{problem} after {complete} members: {reason}"
        if group is not None:
            group.cut_off = problem
            yield group
        raise ShardProblem(message) from None
    if group is not None:
        yield group
