"""``cdam pack``: a folder of image files becomes WebDataset shards that ``cdam explain`` reads.

Layouts of the source folder SRC (files are found anywhere below it, in sorted path order):

- ``imagenet``: ``SRC/<wnid>/<image>``; the label is timm's ImageNet-1k index of the wnid.
- ``csv``: the images named in a ``filename,label`` CSV (paths relative to SRC, integer labels).
- ``flat``: every image, without labels.

Each image becomes one sample, members in sorted order: ``<key>.cls`` (the label, when there is one),
``<key>.<ext>`` (the file's bytes, unchanged; its extension lower-cased) and ``<key>.json``
(``{"filename": <path relative to SRC>}``). A key is the relative path without its extension, dots
replaced by ``_`` (WebDataset splits key and extension at the first dot of a name), and ``_2``, ``_3``, ...
appended when that key is already taken. Samples go to ``OUTDIR/shard-000000.tar``, ... (``maxcount`` per
shard), then ``OUTDIR/index.json`` lists the shards and every file that was not packed, with the reason.

Files are read and checked (decoded exactly as the job decodes them) in a process pool; a file that cannot
be read or decoded is skipped and listed. Tars are byte-deterministic: no times, owners or
permissions of the source files go into them, so the same folder always gives the same shards.
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
import posixpath
import re
import sys
import tarfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from cdam_worker.shards.samples import IMAGE_EXTENSIONS, MAX_MEMBER_BYTES, ImageError, decode_image
from cdam_worker.shards.specs import DataError
from cdam_worker.storage import Storage

LAYOUTS = ("imagenet", "csv", "flat")
INDEX_PATH = "index.json"
INDEX_FORMAT = "cdam.pack/1"
SHARD_PATTERN = re.compile(r"shard-\d{6}\.tar")
MAX_LABEL = 2**31 - 1
"""Labels are stored as int32."""
FILES_PER_TASK = 16
"""Files read and checked per task of the process pool."""


class PackError(DataError):
    """A source folder, labels file or output that cannot be packed; the message is one line."""


@dataclass(frozen=True)
class SourceImage:
    """An image file to pack: its path relative to SRC ('/'-separated), its label and its sample key."""

    path: str
    label: int | None
    key: str


@dataclass(frozen=True)
class Skipped:
    """A file below SRC (or a row of the labels file) that was not packed, and why (one line)."""

    file: str
    reason: str


@dataclass
class PackResult:
    """What :func:`pack` wrote: the ``index.json`` entries of the shards, and what it skipped."""

    shards: list[dict[str, int | str]]
    skipped: list[Skipped]

    @property
    def n_samples(self) -> int:
        return sum(int(shard["samples"]) for shard in self.shards)

    @property
    def n_bytes(self) -> int:
        return sum(int(shard["bytes"]) for shard in self.shards)


def pack(
    src: str | Path,
    outdir: str,
    *,
    layout: str,
    labels: str | Path | None = None,
    maxcount: int = 1000,
    workers: int = 1,
    overwrite: bool = False,
) -> PackResult:
    """Pack the images below ``src`` into shards in ``outdir`` (a folder or s3://bucket/prefix).

    PackError (one line) when the source, the labels file or the output cannot be used; files that cannot
    be read or decoded are skipped and listed in the result and in ``index.json``. When no file can be packed
    the result has no shards, and ``index.json`` still lists every file skipped.
    """
    if maxcount < 1:
        raise PackError(f"--maxcount must be >= 1, got {maxcount}")
    if workers < 1:
        raise PackError(f"--workers must be >= 1, got {workers}")
    src = Path(src).resolve()
    images, skipped = list_source(src, layout, labels)
    storage = _prepare_output(outdir, overwrite)
    shards: list[dict[str, int | str]] = []
    samples: list[tuple[str, dict[str, bytes]]] = []

    def write_shard() -> None:
        name = f"shard-{len(shards):06d}.tar"
        data = shard_bytes(samples)
        storage.put(name, data)
        shards.append({"shard": name, "samples": len(samples), "bytes": len(data)})
        samples.clear()

    with tqdm(total=len(images), desc="packing", unit="image", file=sys.stderr) as bar:
        for image, content in _read_checked(src, images, workers):
            bar.update()
            if isinstance(content, str):
                skipped.append(Skipped(image.path, content))
                continue
            samples.append((image.key, _members(image, content)))
            if len(samples) == maxcount:
                write_shard()
    if samples:
        write_shard()
    result = PackResult(shards, sorted(skipped, key=lambda s: s.file))
    index = {
        "format": INDEX_FORMAT,
        "source": str(src),
        "layout": layout,
        "maxcount": maxcount,
        "samples": result.n_samples,
        "shards": shards,
        "skipped": [asdict(s) for s in result.skipped],
    }
    storage.put(INDEX_PATH, (json.dumps(index, indent=1, ensure_ascii=False) + "\n").encode())
    return result


def list_source(src: Path, layout: str, labels: str | Path | None) -> tuple[list[SourceImage], list[Skipped]]:
    """The images of ``src`` to pack, labelled and keyed, in path order, and the files skipped already."""
    if layout not in LAYOUTS:
        raise PackError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if (layout == "csv") != (labels is not None):
        raise PackError("--labels FILE.csv goes with --layout csv (and --layout csv needs --labels)")
    if not src.is_dir():
        raise PackError(f"source folder {src} does not exist or is not a folder")
    files, skipped = _files_below(src)
    image_files = [path for path in files if _is_image_file(path)]
    skipped += [
        Skipped(path, "not an image file (extensions: " + ", ".join(IMAGE_EXTENSIONS) + ")")
        for path in files
        if not _is_image_file(path)
    ]
    if layout == "imagenet":
        labelled, unlabelled = _imagenet_labels(image_files)
    elif layout == "csv":
        labelled, unlabelled = _csv_labels(Path(labels), image_files, set(files))  # type: ignore[arg-type]
    else:
        labelled, unlabelled = [(path, None) for path in image_files], []
    keys = sample_keys([path for path, _ in labelled])
    return [SourceImage(path, label, key) for (path, label), key in zip(labelled, keys)], skipped + unlabelled


def sample_keys(paths: list[str]) -> list[str]:
    """WebDataset keys of relative image paths: the path without its extension, dots replaced by '_';
    a key already taken by an earlier path gets '_2', '_3', ... appended."""
    keys: list[str] = []
    taken: set[str] = set()
    for path in paths:
        base = posixpath.splitext(path)[0].replace(".", "_")
        key, number = base, 1
        while key in taken:
            number += 1
            key = f"{base}_{number}"
        taken.add(key)
        keys.append(key)
    return keys


def shard_bytes(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    """A tar of ``(key, {extension: data})`` samples, members named ``key.extension`` in sorted order.

    Every member has mtime 0, mode 0644 and no owner, so the bytes depend on the samples alone.
    """
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key, members in samples:
            for extension in sorted(members):
                info = tarfile.TarInfo(f"{key}.{extension}")  # mtime 0, mode 0o644, uid/gid 0, no names
                info.size = len(members[extension])
                tar.addfile(info, io.BytesIO(members[extension]))
    return buffer.getvalue()


# --- the source folder --------------------------------------------------------------------------------


def _files_below(src: Path) -> tuple[list[str], list[Skipped]]:
    """'/'-separated paths, relative to ``src``, of every file below it, sorted; and those whose path is
    not valid UTF-8 (sample keys must be), skipped."""
    files, skipped = [], []
    for folder, _, names in os.walk(src):
        relative = Path(folder).relative_to(src).as_posix()
        for path in (name if relative == "." else f"{relative}/{name}" for name in names):
            try:
                path.encode("utf-8")
                files.append(path)
            except UnicodeEncodeError:  # undecodable bytes of the name, kept by os.walk as surrogates
                readable = path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                skipped.append(Skipped(readable, "file name is not valid UTF-8"))
    return sorted(files), skipped


def _is_image_file(path: str) -> bool:
    return posixpath.splitext(path)[1].lower().lstrip(".") in IMAGE_EXTENSIONS


def _imagenet_labels(image_files: list[str]) -> tuple[list[tuple[str, int | None]], list[Skipped]]:
    """Label each ``<wnid>/...`` image with timm's ImageNet-1k index of the wnid."""
    from timm.data import ImageNetInfo

    index = {wnid: i for i, wnid in enumerate(ImageNetInfo("imagenet-1k").label_names())}
    images, skipped = [], []
    for path in image_files:
        folder, inside, _ = path.partition("/")
        if not inside:
            skipped.append(Skipped(path, "not in a class folder (layout imagenet: SRC/<wnid>/<image>)"))
        elif folder not in index:
            skipped.append(Skipped(path, f"folder {folder!r} is not an ImageNet-1k wnid"))
        else:
            images.append((path, index[folder]))
    if image_files and not images:
        raise PackError("no folder of the source is an ImageNet-1k wnid (like n01440764); use --layout csv or flat")
    return images, skipped


def _csv_labels(
    labels: Path, image_files: list[str], files: set[str]
) -> tuple[list[tuple[str, int | None]], list[Skipped]]:
    """Label the images named in a ``filename,label`` CSV; rows that cannot be used are listed, not packed."""
    try:
        with open(labels, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            if not {"filename", "label"} <= set(columns):
                raise PackError(
                    f"--labels {labels}: expected a header with the columns filename,label, got {','.join(columns) or 'nothing'}"
                )
            rows = [(reader.line_num, row["filename"] or "", (row["label"] or "").strip()) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise PackError(f"--labels {labels}: cannot read it: {error}") from None
    labelled: dict[str, int] = {}
    first_line: dict[str, int] = {}
    named: set[str] = set()  # paths with a row, usable or not
    skipped = []
    for line, filename, label in rows:
        where = f"{labels.name} line {line}"
        path = posixpath.normpath(filename)
        named.add(path)
        if not filename or path.startswith(("/", "../")) or path == "..":
            skipped.append(Skipped(filename, f"{where}: filename must be a path inside the source folder"))
        elif path in first_line:
            skipped.append(Skipped(path, f"{where}: repeats the file of line {first_line[path]}"))
        elif not re.fullmatch(r"[0-9]+", label) or int(label) > MAX_LABEL:
            skipped.append(Skipped(path, f"{where}: label {label!r} is not an integer from 0 to {MAX_LABEL}"))
        elif path not in files:
            skipped.append(Skipped(path, f"{where}: no such file in the source folder"))
        else:
            first_line[path] = line
            if _is_image_file(path):  # other files are listed as 'not an image file' already
                labelled[path] = int(label)
    skipped += [Skipped(path, f"no row in {labels.name}") for path in image_files if path not in named]
    return [(path, labelled[path]) for path in image_files if path in labelled], skipped


# --- reading and checking files in a process pool -----------------------------------------------------


def _read_checked(src: Path, images: list[SourceImage], workers: int) -> Iterator[tuple[SourceImage, bytes | str]]:
    """Each image with its bytes, or the reason (str) it cannot be packed; in order, few tasks in flight.

    The pool forks from a fresh server process (``forkserver``), never from this one, which may run
    threads (Ray, progress bars) that a plain fork would copy in an unknown state.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    batches = [images[start : start + FILES_PER_TASK] for start in range(0, len(images), FILES_PER_TASK)]
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        in_flight: deque[tuple[list[SourceImage], Future]] = deque()
        for batch in batches:
            in_flight.append(
                (batch, pool.submit(_read_and_check_files, [(str(src / image.path), image.path) for image in batch]))
            )
            if len(in_flight) > 2 * workers:
                yield from _paired(*in_flight.popleft())
        while in_flight:
            yield from _paired(*in_flight.popleft())


def _paired(batch: list[SourceImage], future: Future) -> Iterator[tuple[SourceImage, bytes | str]]:
    yield from zip(batch, future.result())


def _read_and_check_files(files: list[tuple[str, str]]) -> list[bytes | str]:
    """For each (absolute path, name): its bytes if it decodes as the job would decode it, else the reason."""
    return [_read_and_check(path, name) for path, name in files]


def _read_and_check(path: str, name: str) -> bytes | str:
    try:
        size = os.path.getsize(path)
        if size > MAX_MEMBER_BYTES:
            return f"file {name!r} is too large ({size} bytes; the job reads members up to {MAX_MEMBER_BYTES})"
        with open(path, "rb") as handle:
            data = handle.read()
        decode_image(data, name)
    except OSError as error:
        return f"cannot read {name!r}: {error.strerror or error}"
    except ImageError as error:
        return str(error)
    return data


def _members(image: SourceImage, data: bytes) -> dict[str, bytes]:
    """The members of an image's sample, by extension."""
    extension = posixpath.splitext(image.path)[1].lower().lstrip(".")
    members = {extension: data, "json": json.dumps({"filename": image.path}, ensure_ascii=False).encode()}
    if image.label is not None:
        members["cls"] = str(image.label).encode()
    return members


# --- the output ---------------------------------------------------------------------------------------


def _prepare_output(outdir: str, overwrite: bool) -> Storage:
    """The output storage, checked writable; earlier shards and index there are refused, or deleted with ``overwrite``."""
    storage = Storage.from_url(outdir)
    storage.check_writable()
    earlier = [path for path in storage.list() if path == INDEX_PATH or SHARD_PATTERN.fullmatch(path)]
    if earlier and not overwrite:
        n_shards = sum(1 for path in earlier if path != INDEX_PATH)
        held = " and ".join(
            ([f"{n_shards} shard(s)"] if n_shards else []) + ([INDEX_PATH] if INDEX_PATH in earlier else [])
        )
        raise PackError(f"{storage.url} already holds {held} of an earlier pack; use --overwrite to replace them")
    for path in earlier:
        storage.delete(path)
    return storage
