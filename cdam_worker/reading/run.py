"""``open_run(DEST)``: a finished (or partly finished) cdam run, read through its output contract.

The contract (``schemas/README.md``): a shard's completion marker is written last, after its Zarr
chunks and Parquet files, so only shards with a marker are read. Everything else (shards still running,
failed, or cut off) is listed in :attr:`Run.skipped` with the reason, and never read.

Reading is lazy and chunk-wise: opening a run reads the manifest, the Zarr group's metadata and the
marker listing; tables are read when asked for, maps a chunk of rows at a time.
"""

from __future__ import annotations

import contextlib
import functools
import io
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import zarr

from cdam_worker.class_names import resolve_class
from cdam_worker.messages import one_line
from cdam_worker.output_lock import LockRenewal, OutputLock
from cdam_worker.reading.arrow_fs import storage_filesystem
from cdam_worker.run_files import open_zarr, read_json
from cdam_worker.shards.member_index import member_offsets, read_sample
from cdam_worker.shards.samples import Sample
from cdam_worker.storage import Storage, StorageError
from schemas import DERIVED_GROUP, ERRORS_SCHEMA, HEAD_GROUP, INT_FILL, METADATA_SCHEMA
from schemas.manifest import ModelSpec
from schemas.paths import (
    ERRORS_DIR,
    MANIFEST_PATH,
    MARKERS_DIR,
    MEMBERS_DIR,
    METADATA_DIR,
    ZARR_PATH,
    marker_path,
    shard_table_path,
    task_lock_path,
)

if TYPE_CHECKING:
    import duckdb
    import xarray as xr
    from PIL import Image

    from cdam_worker.maps.model import LoadedModel

READ_ROWS = 256
"""Rows of maps read per step by the chunk-wise readers (a multiple of the 16-row chunks)."""
IMAGE_INDEX_SHARDS = 64
"""Shards whose tar member index (for ``Run.image``) is kept in memory."""

TARGETS_VIEW_SQL = """
CREATE OR REPLACE VIEW targets AS
SELECT key, "row", shard, label, pred,
       s.slot - 1 AS slot,
       targets[s.slot] AS class,
       target_names[s.slot] AS name,
       relevance_pos_sum[s.slot] AS pos_sum,
       relevance_neg_sum[s.slot] AS neg_sum,
       relevance_argmax[s.slot] AS argmax
FROM metadata, LATERAL (SELECT unnest(range(1, len(targets) + 1)) AS slot) AS s
"""


class RunError(ValueError):
    """A run that cannot be read, or cannot do what was asked of it; the message is one line."""


@dataclass(frozen=True)
class ShardInfo:
    """One shard of the run as its manifest plans it, and what the output holds of it."""

    index: int
    name: str
    url: str
    n_samples: int
    complete: bool  # its completion marker exists: its rows and tables are whole
    n_images: int  # from the marker (0 when not complete)
    n_errors: int


class Run:
    """A cdam output (local folder or s3://), read-only. Build it with :func:`open_run`."""

    def __init__(self, storage: Storage, manifest: dict[str, Any], group: zarr.Group) -> None:
        self.storage = storage
        self.url = storage.url
        self.manifest = manifest
        self.group = group
        self.attrs: dict[str, Any] = dict(group.attrs)
        self._arrays: dict[str, zarr.Array] = {}
        self.shards = self._read_shards()
        self.skipped: list[str] = [
            f"shard {s.name}: no completion marker (still running, failed or cut off): not read"
            for s in self.shards
            if not s.complete
        ]

    # -- what the run is ---------------------------------------------------------------------------

    @property
    def class_names(self) -> list[str]:
        return list(self.attrs["class_names"])

    @property
    def grid(self) -> tuple[int, int]:
        """Tokens per column and per row of every map: (gh, gw)."""
        gh, gw = self.attrs["patch_grid"]
        return int(gh), int(gw)

    @property
    def n_targets(self) -> int:
        return int(self.array("cdam").shape[1])

    @property
    def complete(self) -> bool:
        """Whether the job finished every shard (the manifest says so)."""
        return self.manifest.get("status") == "complete"

    @property
    def has_basis(self) -> bool:
        return "basis" in self.array_names

    @functools.cached_property
    def array_names(self) -> list[str]:
        return sorted(name for name, _ in self.group.arrays())

    @functools.cached_property
    def head(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The model's linear head stored with the basis, (weight (C, D), bias (C)) float32; None for a run
        without ``--store-basis`` (or made before heads were stored)."""
        if HEAD_GROUP not in self.group:
            return None
        return self.group[f"{HEAD_GROUP}/weight"][:], self.group[f"{HEAD_GROUP}/bias"][:]

    def load_model(self, spec: ModelSpec | None = None) -> LoadedModel:
        """The run's model, from ``spec`` (the ``explain`` model flags) or else from the manifest's record.

        RunError (one line) when it cannot be loaded, or is not the model the run was made with (its
        checkpoint's sha256, or its classes, differ from those the run recorded).
        """
        if spec is None:
            source = self.manifest.get("model_source")
            if source is None:
                raise RunError(
                    f"{self.url}: the manifest does not say how to load the model (a run made by an older cdam); give the model flags (--model, --checkpoint, ...)"
                )
            spec = ModelSpec(**source)
        from cdam_worker.maps.model import (
            ModelLoadError,
            load_model,
        )  # torch and timm: only for the commands that run the model

        try:
            loaded = load_model(
                spec.name,
                pretrained=spec.pretrained,
                checkpoint=spec.checkpoint,
                head_checkpoint=spec.head_checkpoint,
                **dict(spec.model_kwargs),
            )
        except ModelLoadError as error:
            raise RunError(
                f"cannot load the run's model: {error}; give the model flags (--model, --checkpoint, ...)"
            ) from None
        recorded = self.attrs.get("model", {})
        for what, sha in (("checkpoint", loaded.checkpoint_sha256), ("head checkpoint", loaded.head_checkpoint_sha256)):
            expected = recorded.get(f"{what.replace(' ', '_')}_sha256")
            if sha != expected:
                raise RunError(
                    f"the {what} given is not the one {self.url} was made with (sha256 {str(sha)[:12]}, the run's {str(expected)[:12]})"
                )
        if loaded.class_names != self.class_names:
            raise RunError(
                f"the model's {loaded.num_classes} classes differ from the run's {len(self.class_names)} ({self.url})"
            )
        return loaded

    # -- in a notebook -----------------------------------------------------------------------------

    def _repr_html_(self) -> str:
        """The run's summary in Jupyter: model and CDAM path, targets, concepts, images, shards."""
        from cdam_worker.views.notebook import summary_html

        return summary_html(self)

    def show(self, key: str, target: str | int | None = None, size: int = 512) -> Image.Image:
        """``cdam show``'s picture: image ``key`` as the model saw it with its map of ``target`` overlaid (same colours).

        ``target``: a class name or index, a concept name, ``"attention"``, or None for the predicted class.
        """
        from cdam_worker.views.show import show_figure

        return show_figure(self, key, None if target is None else str(target), size)[0]

    def class_index(self, name_or_index: str | int) -> int:
        """A class's index from its name or index (RunError naming it if the run has no such class)."""
        try:
            return resolve_class(name_or_index, self.class_names)
        except (KeyError, ValueError, IndexError) as error:
            message = error.args[0] if error.args else error  # a KeyError's str() would add quotes
            raise RunError(f"class {name_or_index!r}: {message}") from None

    # -- tables ------------------------------------------------------------------------------------

    @functools.cached_property
    def metadata(self) -> ds.Dataset:
        """One row per explained image of every complete shard (schema ``cdam.metadata/1``), lazily read."""
        return self._dataset(METADATA_DIR, METADATA_SCHEMA)

    @functools.cached_property
    def errors(self) -> pa.Table:
        """One row per sample (or shard, key null) that could not be explained, of every shard that has any."""
        return self._dataset(ERRORS_DIR, ERRORS_SCHEMA).to_table()

    @functools.cached_property
    def index(self) -> pa.Table:
        """key, row, shard, label, pred and targets of every explained image, sorted by row."""
        table = self.metadata.to_table(columns=["key", "row", "shard", "label", "pred", "targets"])
        return table.sort_by("row")

    def sql(self) -> duckdb.DuckDBPyConnection:
        """A DuckDB connection with tables ``metadata`` and ``errors`` and the view ``targets``
        (one row per image and target slot: key, row, slot, class, name, pos_sum, neg_sum, argmax)."""
        import duckdb

        connection = duckdb.connect()
        connection.register("metadata", self.metadata)
        connection.register("errors", self.errors)
        connection.execute(TARGETS_VIEW_SQL)
        return connection

    def table(self, path: str) -> pa.Table:
        """A Parquet file below the run (e.g. ``audit/classes.parquet``); FileNotFoundError if absent."""
        return pq.read_table(storage_filesystem(self.storage).open_input_file(path))

    # -- maps derived later (``cdam derive``) ---------------------------------------------------------

    def derived_names(self) -> list[str]:
        """Names of the finished derivations of the run (``cdam derive --name NAME``), sorted; one still
        running (or cut off before it first finished) is not listed."""
        names = sorted(
            {
                path.split("/")[1]
                for path in self.storage.list(DERIVED_GROUP)
                if path.count("/") == 2 and path.endswith("/manifest.json")
            }
        )
        return [
            name
            for name in names
            if (read_json(self.storage, f"{DERIVED_GROUP}/{name}/manifest.json") or {}).get("status")
            in ("complete", "partial")
        ]

    def derived_metadata(self, name: str) -> pa.Table:
        """Derivation ``name``'s table (schema ``cdam.derived-metadata/1``): per derived image ``key``, ``row``, and
        per slot ``targets`` (class, -1 concept), ``target_names`` and the relevance sums; its maps are the array
        ``derived/NAME/cdam`` (``read_rows``). RunError if the run has no such finished derivation."""
        if name not in self.derived_names():
            raise RunError(f"{self.url} has no derived maps named {name!r} (made by `cdam derive --name NAME`)")
        return self.table(f"{DERIVED_GROUP}/{name}/metadata.parquet")

    @functools.cached_property
    def _key_positions(self) -> dict[str, int]:
        return {key: position for position, key in enumerate(self.index.column("key").to_pylist())}

    def rows_of(self, keys: Sequence[str]) -> np.ndarray:
        """The Zarr row of each key (RunError naming the first key that is not an explained image)."""
        positions = self._key_positions
        missing = [key for key in keys if key not in positions]
        if missing:
            raise RunError(
                f"key {missing[0]!r} is not an explained image of {self.url}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        rows = self.index.column("row").to_numpy()
        return rows[np.asarray([positions[key] for key in keys], dtype=np.int64)].astype(np.int64)

    # -- arrays ------------------------------------------------------------------------------------

    @functools.cached_property
    def maps(self) -> xr.Dataset:
        """Every array of ``cdam.zarr`` as a lazy xarray Dataset (image, target, y, x, ...)."""
        import xarray as xr

        return xr.open_zarr(self.storage.zarr_store(ZARR_PATH, read_only=True), consolidated=False, zarr_format=3)

    def array(self, name: str) -> zarr.Array:
        """The Zarr array ``name`` of ``cdam.zarr``. The job's own arrays (``cdam``, ``attention``, ...) are
        opened once (opening reads their metadata); arrays below a sub-group (``derived/...``), which a
        later command may replace, are opened on each call."""
        if "/" in name:
            return self.group[name]
        if name not in self._arrays:
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    def read_rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Array ``name`` at ``rows`` (any order), reading only the chunks that hold them."""
        rows = np.asarray(rows, dtype=np.int64)
        array = self.array(name)
        if rows.size == 0:
            return np.empty((0, *array.shape[1:]), dtype=array.dtype)
        order = np.argsort(rows, kind="stable")
        values = array.get_orthogonal_selection((rows[order],))
        out = np.empty_like(values)
        out[order] = values
        return out

    def iter_rows(self, name: str, rows: np.ndarray, step: int = READ_ROWS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(rows, values) of array ``name`` in steps of ``step`` rows, in the order given."""
        rows = np.asarray(rows, dtype=np.int64)
        for start in range(0, len(rows), step):
            part = rows[start : start + step]
            yield part, self.read_rows(name, part)

    def maps_for(self, keys: Sequence[str], classes: Sequence[str | int]) -> np.ndarray:
        """The stored map of each (key, class): (len(keys), len(classes), gh, gw) float32, NaN where that
        class was not a target of that image."""
        class_ids = np.asarray([self.class_index(c) for c in classes], dtype=np.int64)
        rows = self.rows_of(keys)
        return self.class_maps(rows, np.broadcast_to(class_ids, (len(rows), len(class_ids))))

    def class_maps(self, rows: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """The stored map of class ``classes[i, k]`` of row ``rows[i]``: (n, K, gh, gw) float32, NaN where that
        class was not a target of that image (or is negative). Which slot holds a class comes from the
        index's ``targets`` (the same as the Zarr ``target_class`` row), so only the maps are read."""
        rows = np.asarray(rows, dtype=np.int64)
        classes = np.asarray(classes, dtype=np.int64).reshape(len(rows), -1)
        gh, gw = self.grid
        out = np.full((len(rows), classes.shape[1], gh, gw), np.nan, dtype=np.float32)
        target_class = self._target_classes_of_rows(rows)  # (n, T)
        match = (target_class[:, :, None] == classes[:, None, :]) & (classes[:, None, :] >= 0)  # (n, T, K)
        has = match.any(axis=1)
        slot = match.argmax(axis=1)  # (n, K)
        for start in range(0, len(rows), READ_ROWS):
            part = slice(start, start + READ_ROWS)
            if not has[part].any():
                continue
            maps = self.read_rows("cdam", rows[part])  # (n, T, gh, gw)
            picked = np.take_along_axis(maps, slot[part, :, None, None], axis=1).astype(np.float32)
            picked[~has[part]] = np.nan
            out[part] = picked
        return out

    def _target_classes_of_rows(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), n_targets) class of each target slot of each row (-1 a concept, -2 no such slot or a
        row that is not an explained image)."""
        index_rows = self.index.column("row").to_numpy()  # sorted
        at = np.searchsorted(index_rows, rows)
        found = at < len(index_rows)
        found[found] = index_rows[at[found]] == rows[found]
        out = np.full((len(rows), self.n_targets), INT_FILL, dtype=np.int64)
        out[found] = self._target_classes[at[found]]
        return out

    @functools.cached_property
    def _target_classes(self) -> np.ndarray:
        """(n_images, n_targets) int64: the index's ``targets`` as a padded matrix (-2 past an image's list)."""
        targets = self.index.column("targets").combine_chunks()
        lengths = pc.list_value_length(targets).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        values = pc.list_flatten(targets).to_numpy(zero_copy_only=False).astype(np.int64)
        width = max(self.n_targets, int(lengths.max(initial=0)))
        out = np.full((len(lengths), width), INT_FILL, dtype=np.int64)
        image = np.repeat(np.arange(len(lengths)), lengths)
        slot = np.arange(len(values)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        out[image, slot] = values
        return out[:, : self.n_targets]

    # -- images ------------------------------------------------------------------------------------

    def image(self, key: str) -> Image.Image:
        """The original image of ``key`` (upright, RGB), read from the shard named in the manifest."""
        shard = self._shard_of(key)
        sample = read_sample(shard.url, key, self._member_offsets(shard))
        if not isinstance(sample, Sample):
            raise RunError(f"image of {key!r}: {sample.reason}")
        return sample.image

    def index_images(self) -> int:
        """Index the tar members of the complete shards now (for as many shards as the index cache holds),
        so that later ``image`` calls need only one ranged read per sample; the number of shards indexed.
        Viewers call it in a background thread when they start."""
        shards = [s for s in self.shards if s.complete][:IMAGE_INDEX_SHARDS]
        for shard in shards:
            self._member_offsets(shard)
        return len(shards)

    def _shard_of(self, key: str) -> ShardInfo:
        position = self._key_positions.get(key)
        if position is None:
            raise RunError(f"key {key!r} is not an explained image of {self.url}")
        name = self.index.column("shard")[position].as_py()
        return next(s for s in self.shards if s.name == name)

    @functools.lru_cache(maxsize=IMAGE_INDEX_SHARDS)  # noqa: B019 - one cache per run object is what we want
    def _member_offsets(self, shard: ShardInfo) -> dict[str, list[tuple[str, int, int]]] | None:
        """Where each sample's files lie in ``shard``: from the members table the job wrote as it read the
        shard (one small read), else (runs made before it did, compressed shards) a scan of its tar headers."""
        try:  # small (tens of KiB): one request
            table = pq.read_table(io.BytesIO(self.storage.get(shard_table_path(MEMBERS_DIR, shard.index, shard.name))))
        except (FileNotFoundError, StorageError, pa.ArrowException, OSError):  # absent or unreadable: scan
            return member_offsets(shard.url)
        offsets: dict[str, list[tuple[str, int, int]]] = {}
        for key, member, offset, size in zip(
            *(table.column(name).to_pylist() for name in ("key", "member", "offset", "size"))
        ):
            offsets.setdefault(key, []).append((member, offset, size))
        return offsets

    # -- writing results of a reading command into the run -------------------------------------------

    @contextlib.contextmanager
    def exclusive(self, task: str) -> Iterator[Callable[[], None]]:
        """Hold the lock ``locks/<task>.json`` of the run while writing ``task``'s results into it.

        A second holder of the same task (another ``cdam audit`` on this run, say) is refused with
        OutputInUseError; yields a check to call now and then, which raises OutputLockLost if another
        process took the lock over (this one was paused past its lease).
        """
        lock = OutputLock(self.storage, task, path=task_lock_path(task))
        lock.acquire()
        renewal = LockRenewal(lock)
        try:
            yield renewal.check
        finally:
            renewal.stop()
            lock.release()

    # -- helpers -----------------------------------------------------------------------------------

    def _read_shards(self) -> list[ShardInfo]:
        markers = set(self.storage.list(MARKERS_DIR))
        shards = []
        for entry in self.manifest["settings"]["shards"]:
            index = int(entry["index"])
            named = next((s for s in self.manifest.get("shards", []) if s.get("index") == index), {})
            name = named.get("name") or self.attrs["shards"][index]
            marker = read_json(self.storage, marker_path(index)) if marker_path(index) in markers else None
            shards.append(
                ShardInfo(
                    index,
                    name,
                    entry["url"],
                    int(entry["n_samples"]),
                    marker is not None,
                    int((marker or {}).get("n_images", 0)),
                    int((marker or {}).get("n_errors", 0)),
                )
            )
        return shards

    def _dataset(self, folder: str, schema: pa.Schema) -> ds.Dataset:
        present = set(self.storage.list(folder))
        paths = [
            path for s in self.shards if s.complete and (path := shard_table_path(folder, s.index, s.name)) in present
        ]
        if folder == ERRORS_DIR:  # a failed shard's one-line record has no marker, but is part of the contract
            paths += [
                path
                for s in self.shards
                if not s.complete and (path := shard_table_path(folder, s.index, s.name)) in present
            ]
        if not paths:
            return ds.dataset(pa.Table.from_pylist([], schema=schema))
        return ds.dataset(
            paths, schema=schema, format=ds.ParquetFileFormat(), filesystem=storage_filesystem(self.storage)
        )


def open_run(dest: str) -> Run:
    """Open the cdam output at ``dest`` (a folder or s3://bucket/prefix; S3 uses the job's AWS settings).

    RunError when ``dest`` holds no cdam run. A run still in progress, or with failed shards, opens: only
    its complete shards are read, and :attr:`Run.skipped` says what was left out.
    """
    storage = Storage.from_url(dest)
    manifest = read_json(storage, MANIFEST_PATH)
    if manifest is None:
        raise RunError(
            f"{storage.url}: no {MANIFEST_PATH}, so no cdam run (make one with `cdam explain ... --output {dest}`)"
        )
    if not isinstance(manifest.get("settings"), dict) or "shards" not in manifest["settings"]:
        raise RunError(f"{storage.url}/{MANIFEST_PATH} is not a cdam run manifest")
    try:
        group = open_zarr(storage, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as error:  # type: ignore[attr-defined]
        raise RunError(f"{storage.url}: no readable {ZARR_PATH} ({one_line(error, 200)})") from None
    return Run(storage, manifest, group)
