"""Shard indexes: the samples of each shard from a small file, so a run is planned without reading a tar.

Three formats (:func:`read_shard_index`):

- a ``wids`` shard list, ``{"shardlist": [{"url": ..., "nsamples": ...}, ...]}``; urls absolute (a path or
  ``s3://``) or relative to the index file;
- the ``index.json`` that ``cdam pack`` writes (``{"format": "cdam.pack/1", "shards": [{"shard": ..., "samples":
  ...}]}``), shards beside the file; :func:`index_beside` finds it without the flag;
- img2dataset's per-shard ``NNNNN_stats.json`` (``successes`` samples in ``NNNNN.tar`` beside it); the flag then
  names them all with a glob or brace pattern (``'out/*_stats.json'``).
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from cdam_worker.shards.packing import INDEX_FORMAT, INDEX_PATH
from cdam_worker.shards.specs import DataError, expand_shard_specs
from cdam_worker.storage import StorageError, split_url

IMG2DATASET_SUFFIX = "_stats.json"
STATS_READERS = 32  # img2dataset stats files read at once (LAION-400M: 40,000 of them)


@dataclass(frozen=True)
class IndexEntry:
    """A shard the index lists: its URL (as :func:`expand_shard_specs` writes URLs) and its samples."""

    url: str
    n_samples: int


def read_shard_index(spec: str) -> list[IndexEntry]:
    """The shards (in the index's order) that the index file(s) ``spec`` lists; DataError, one line, if unusable."""
    files = expand_shard_specs([spec])
    if all(posixpath.basename(url).endswith(IMG2DATASET_SUFFIX) for url in files):
        with ThreadPoolExecutor(STATS_READERS) as readers:  # one small object each: latency-bound on S3
            return list(readers.map(_img2dataset_entry, files))
    if len(files) != 1:
        raise DataError(f"--shard-index {spec!r} names {len(files)} files; give one index file (or *_stats.json files)")
    document = _read_json(files[0])
    if isinstance(document, dict) and "shardlist" in document:
        return _wids_entries(files[0], document)
    if isinstance(document, dict) and document.get("format") == INDEX_FORMAT:
        return _pack_entries(files[0], document)
    raise DataError(
        f"shard index {files[0]}: not a wids shard list ({{'shardlist': [...]}}), a cdam pack index.json or img2dataset *_stats.json"
    )


def index_beside(urls: Sequence[str]) -> list[IndexEntry] | None:
    """The ``cdam pack`` index.json in the folder of ``urls`` when they all lie in one folder and it lists each of
    them; None otherwise (one existence check)."""
    folders = {posixpath.dirname(url) for url in urls}
    if len(folders) != 1:
        return None
    url = f"{folders.pop()}/{INDEX_PATH}"
    storage, name = split_url(url)
    try:
        if not storage.exists(name):
            return None
    except StorageError:
        return None
    document = _read_json(url)
    if not isinstance(document, dict) or document.get("format") != INDEX_FORMAT:
        return None
    entries = _pack_entries(url, document)
    listed = {entry.url for entry in entries}
    return entries if all(u in listed for u in urls) else None


def entries_for(entries: list[IndexEntry], urls: Sequence[str], source: str) -> list[IndexEntry]:
    """The index's entries of ``urls``, in that order; DataError naming the first shard the index does not list."""
    by_url = {entry.url: entry for entry in entries}
    missing = [url for url in urls if url not in by_url]
    if missing:
        raise DataError(
            f"shard {missing[0]} is not in the shard index {source} ({len(missing)} of the --shards are not)"
        )
    return [by_url[url] for url in urls]


def _read_json(url: str) -> object:
    storage, name = split_url(url)
    try:
        return json.loads(storage.get(name))
    except FileNotFoundError:
        raise DataError(f"shard index {url} does not exist") from None
    except (StorageError, OSError) as error:
        raise DataError(f"cannot read shard index {url}: {error}") from None
    except ValueError as error:
        raise DataError(f"shard index {url} is not valid JSON: {error}") from None


def _count(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DataError(f"{where}: the sample count must be an integer >= 0, got {value!r}")
    return value


def _resolve(index_url: str, url: str) -> str:
    """``url`` as an absolute shard URL: relative ones are relative to the index file's folder."""
    if url.startswith("s3://") or url.startswith("/"):
        return url
    if url.startswith("file://"):
        return url[len("file://") :]
    return posixpath.normpath(posixpath.join(posixpath.dirname(index_url), url)).replace("s3:/", "s3://", 1)


def _wids_entries(index_url: str, document: dict) -> list[IndexEntry]:
    """A wids shard list: ``{"shardlist": [{"url": ..., "nsamples": ...}]}``."""
    return _listed_entries(index_url, document, "shardlist", ("url", "a 'url' string"), "nsamples")


def _pack_entries(index_url: str, document: dict) -> list[IndexEntry]:
    """The index.json of ``cdam pack``: ``{"shards": [{"shard": ..., "samples": ...}]}``."""
    return _listed_entries(index_url, document, "shards", ("shard", "a 'shard' name"), "samples")


def _listed_entries(
    index_url: str, document: dict, list_key: str, url: tuple[str, str], count_key: str
) -> list[IndexEntry]:
    """The entries of ``document[list_key]``, each with its shard at ``url[0]`` (``url[1]`` says what it must be)
    and its sample count at ``count_key``."""
    listed = document.get(list_key)
    if not isinstance(listed, list):
        raise DataError(f"shard index {index_url}: '{list_key}' must be a list")
    url_key, url_words = url
    entries = []
    for number, shard in enumerate(listed):
        where = f"shard index {index_url}, {list_key}[{number}]"
        if not isinstance(shard, dict) or not isinstance(shard.get(url_key), str):
            raise DataError(f"{where}: needs {url_words} and '{count_key}'")
        entries.append(IndexEntry(_resolve(index_url, shard[url_key]), _count(shard.get(count_key), where)))
    return _unique(entries, index_url)


def _img2dataset_entry(stats_url: str) -> IndexEntry:
    document = _read_json(stats_url)
    if not isinstance(document, dict):
        raise DataError(f"img2dataset stats {stats_url}: not a JSON object")
    shard = stats_url[: -len(IMG2DATASET_SUFFIX)] + ".tar"
    return IndexEntry(shard, _count(document.get("successes"), f"img2dataset stats {stats_url} ('successes')"))


def _unique(entries: list[IndexEntry], index_url: str) -> list[IndexEntry]:
    seen: set[str] = set()
    for entry in entries:
        if entry.url in seen:
            raise DataError(f"shard index {index_url} lists shard {entry.url} twice")
        seen.add(entry.url)
    return entries
