"""One sample by key, without streaming its shard: where each file of an uncompressed shard lies in it
(from its headers alone, also on S3), and a sample read with one ranged request (``Run.image``)."""

from __future__ import annotations

import tarfile
from typing import BinaryIO

from cdam_worker.messages import one_line
from cdam_worker.shards.samples import KeyGroup, Member, Sample, SampleError, decode_group, is_read
from cdam_worker.shards.tar_reader import (
    READ_ERRORS,
    ShardProblem,
    StrictTarInfo,
    is_compressed,
    open_shard,
    read_groups,
    split_member_name,
)
from cdam_worker.storage import StorageError, split_url

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
        with open_shard(url, scan=True) as reader:
            if is_compressed(reader):
                return None
            offsets = _plain_tar_offsets(reader)
            if offsets is None:  # something tarfile must judge: it reads the whole tar again
                reader.seek(0)
                offsets = _tarfile_offsets(reader)
    except ShardProblem:
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
    except READ_ERRORS:
        return None


def _tarfile_offsets(reader: BinaryIO) -> dict[str, list[tuple[str, int, int]]]:
    """:func:`member_offsets` by tarfile, for any tar: up to the first broken header, if there is one."""
    offsets: dict[str, list[tuple[str, int, int]]] = {}
    try:
        with tarfile.open(fileobj=reader, mode="r:", tarinfo=StrictTarInfo) as tar:
            while (info := tar.next()) is not None:
                tar.members.clear()
                if info.isreg():
                    key, _ = split_member_name(info.name)
                    offsets.setdefault(key, []).append((info.name, info.offset_data, info.size))
    except READ_ERRORS:
        pass  # what was indexed before a broken header is still readable
    return offsets


def read_sample(
    url: str, key: str, offsets: dict[str, list[tuple[str, int, int]]] | None = None
) -> Sample | SampleError:
    """The sample ``key`` of the shard at ``url``, decoded exactly as the job decodes it.

    With ``offsets`` (:func:`member_offsets`), only that sample's members are read; without, the shard is
    streamed up to the sample.
    """
    if offsets is not None:
        if key not in offsets:
            return SampleError(key, f"no sample {key!r} in {url}")
        members = [(member, split_member_name(member)[1], offset, size) for member, offset, size in offsets[key]]
        wanted = [(offset, size) for _, extension, offset, size in members if is_read(extension, size)]
        try:
            data = _read_members(url, wanted)
        except (StorageError, OSError) as exc:
            return SampleError(key, f"cannot read shard {url}: {one_line(exc)}")
        group = KeyGroup(
            key,
            [Member(member, extension, size, data.get(offset), offset) for member, extension, offset, size in members],
        )
        return decode_group(group, 0, {}, require_label=False)
    try:
        with open_shard(url) as reader:
            for group in read_groups(reader, "r|*", read_data=True):
                if group.key == key:
                    return decode_group(group, 0, {}, require_label=False)
    except ShardProblem as problem:
        return SampleError(key, str(problem))
    return SampleError(key, f"no sample {key!r} in {url}")
