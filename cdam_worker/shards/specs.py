"""Shard specs to shards: paths, globs, brace patterns and S3 prefixes to a list of URLs, and shard names."""

from __future__ import annotations

import fnmatch
import glob
import os
import re
from collections.abc import Sequence

from braceexpand import braceexpand

from cdam_worker.storage import Storage, StorageError

TAR_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tar")
_GLOB_CHARACTERS = re.compile(r"[*?\[]")


class DataError(ValueError):
    """Shard specs that cannot be resolved; the message names the spec."""


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
    for suffix in TAR_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _expand_pattern(pattern: str, listings: dict[str, list[str]]) -> list[str]:
    """Shards matching one brace-free pattern: the file itself, or the sorted glob matches."""
    if pattern.startswith("s3://"):
        return _expand_s3_pattern(pattern, listings)
    if pattern.startswith("file://"):
        pattern = pattern[len("file://") :]
    pattern = os.path.abspath(os.path.expanduser(pattern))
    if _GLOB_CHARACTERS.search(pattern):
        return sorted(path for path in glob.glob(pattern) if os.path.isfile(path))
    return [pattern] if os.path.isfile(pattern) else []


def _expand_s3_pattern(pattern: str, listings: dict[str, list[str]]) -> list[str]:
    """S3 objects matching ``pattern``, listing each folder before the first wildcard once."""
    bucket, _, key = pattern[len("s3://") :].partition("/")
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
    return [
        f"{folder.rstrip('/')}/{path}"
        for path in listings[folder]
        if path.count("/") == depth and fnmatch.fnmatchcase(path, wanted)
    ]
