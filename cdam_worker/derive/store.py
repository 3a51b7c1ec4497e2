"""Derived maps written into the run (``cdam derive``): one writer per object, resumable, verifiable.

Under DEST, for a derivation named NAME::

    cdam.zarr/derived/NAME/cdam          (image, target, y, x), the run's maps dtype: the same rows and 16-row
    cdam.zarr/derived/NAME/target_class  (image, target) int32 chunks as ``cdam``; -1 concept, -2 not derived
    derived/NAME/shards/NNNNNN-<shard>.parquet  the shard's per-target statistics (DERIVED_METADATA_SCHEMA)
    derived/NAME/markers/NNNNNN.json     written last per shard: counts, what was skipped, checksums
    derived/NAME/metadata.parquet        every derived shard's statistics in one table, written at the end
    derived/NAME/manifest.json           settings (targets, concepts, the run's fingerprint), status, totals

Shards are derived one at a time, their block of rows in steps of whole chunks, so every object has
one writer; ``locks/derive-NAME.json`` keeps a second ``cdam derive`` of the same name off. A shard with a
marker is done: a rerun derives only the others (shards the run completed since, too).
"""

from __future__ import annotations

import hashlib
import io
import re
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from tqdm import tqdm
from zarr.codecs import ZstdCodec

from cdam_worker.reading.cluster import run_units
from cdam_worker.reading.run import READ_ROWS, Run, RunError, ShardInfo
from cdam_worker.run_files import block_checksums, open_zarr, read_checked_table, read_json, write_json
from cdam_worker.storage import Storage
from schemas import CHUNK_ROWS, DERIVED_GROUP, DERIVED_METADATA_SCHEMA
from schemas.manifest import fingerprint, settings_difference
from schemas.paths import ZARR_PATH, derived_manifest_path, derived_marker_path, derived_root, derived_table_path
from schemas.zarr_layout import FLOAT_FILL, INT_FILL

if TYPE_CHECKING:  # the maths imports torch: cdam verify, which checks what was written, does not need it
    from cdam_worker.derive.compute import DerivedRows, DerivePlan

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
ARRAYS = ("cdam", "target_class")
SKIPPED_LISTED = 20  # skipped images a marker names (all are counted)


@dataclass
class DerivedSummary:
    """What one ``write_derived`` call did."""

    name: str
    status: str  # "complete" (every shard of the run derived) or "partial"
    shards_derived: int  # by this call
    shards_already: int  # derived by an earlier call
    images: int  # derived by this call
    skipped: list[str] = field(default_factory=list)  # "key: reason" of images this call could not derive


def check_name(name: str) -> str:
    """``name`` if it is a valid derivation name (letters, digits, ``_.-``; 64 at most), else RunError."""
    if not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise RunError(f"--name {name!r}: use letters, digits and _ . - (at most 64, starting with a letter or digit)")
    return name


def write_derived(
    run: Run, plan: DerivePlan, name: str, overwrite: bool = False, address: str | None = None
) -> DerivedSummary:
    """Derive ``plan``'s maps for every image of the run's complete shards into ``derived/NAME``.

    Resumes an earlier call with the same settings (shards with a marker are kept); other settings under
    the same name are refused unless ``overwrite``. Holds ``locks/derive-NAME.json`` while it writes. With a
    Ray cluster (``address`` or RAY_ADDRESS) each shard is a task that opens the run and writes its own block,
    table and marker; the driver keeps the lock and writes the combined table and the manifest.
    """
    check_name(name)
    with run.exclusive(f"derive-{name}") as check_lock:
        storage = run.storage
        root = derived_root(name)
        settings = _settings(run, plan)
        manifest = read_json(storage, derived_manifest_path(name))
        if manifest is not None and manifest.get("fingerprint") != fingerprint(settings) and not overwrite:
            differs = settings_difference(manifest.get("settings", {}), settings)
            raise RunError(
                f"derived maps {name!r} of {run.url} were made with other settings ({differs}); use another --name, or --overwrite"
            )
        if manifest is None or overwrite:  # a fresh start: clear what an interrupted first attempt left
            _delete(storage, name)
            _create_arrays(run, name, plan.n_slots)
            write_json(
                storage,
                derived_manifest_path(name),
                {"status": "running", "fingerprint": fingerprint(settings), "settings": settings},
            )
        derived = set(storage.list(f"{root}/markers"))
        todo = [s for s in run.shards if s.complete and derived_marker_path(name, s.index) not in derived]
        summary = DerivedSummary(name, "partial", 0, sum(s.complete for s in run.shards) - len(todo), 0)
        units = _shard_units(run, todo)
        n_rows = sum(len(unit.rows) for unit in units)
        with tqdm(total=n_rows, desc=f"deriving {name}", unit="img", file=sys.stderr, disable=n_rows == 0) as bar:

            def done(marker: dict[str, Any]) -> None:
                summary.shards_derived += 1
                summary.images += marker["n_images"]
                summary.skipped += marker["skipped"]
                bar.update(marker["rows_read"])

            run_units(_derive_unit, units, run, (plan, name), address=address, check=check_lock, done=done)
        check_lock()
        summary.status = _finish(run, name, settings)
        return summary


def _settings(run: Run, plan: DerivePlan) -> dict[str, Any]:
    """What defines the derived bytes: a resume must repeat it."""
    return {
        "targets": str(plan.spec),
        "concepts": [
            {"name": c.name, "similarity": c.similarity, "vector": c.vector.float().tolist()} for c in plan.concepts
        ],
        "run_fingerprint": run.attrs.get("run_fingerprint"),
        "n_slots": plan.n_slots,
        "maps_dtype": str(run.group["cdam"].dtype),
    }


def _delete(storage: Storage, name: str) -> None:
    for prefix in (derived_root(name), f"{ZARR_PATH}/{DERIVED_GROUP}/{name}"):
        for path in storage.list(prefix):
            storage.delete(path)


def _create_arrays(run: Run, name: str, n_slots: int) -> None:
    """The derived arrays, shaped and chunked like the run's ``cdam`` and ``target_class``."""
    cdam = run.group["cdam"]
    n_rows, _, gh, gw = cdam.shape
    group = open_zarr(run.storage, mode="r+").require_group(DERIVED_GROUP).require_group(name)
    for array, shape, dtype, fill, dims in (
        ("cdam", (n_rows, n_slots, gh, gw), cdam.dtype, FLOAT_FILL, ("image", "target", "y", "x")),
        ("target_class", (n_rows, n_slots), np.dtype("int32"), INT_FILL, ("image", "target")),
    ):
        group.create_array(
            array,
            shape=shape,
            chunks=(CHUNK_ROWS, *shape[1:]),
            dtype=dtype,
            fill_value=fill,
            dimension_names=dims,
            compressors=ZstdCodec(level=3),
            overwrite=True,
        )


@dataclass(frozen=True)
class _ShardUnit:
    """One shard to derive: its rows of the index, with their labels and keys."""

    shard: ShardInfo
    rows: np.ndarray
    labels: np.ndarray
    keys: np.ndarray


def _shard_units(run: Run, shards: list[ShardInfo]) -> list[_ShardUnit]:
    index = run.index
    shard_of = np.asarray(index.column("shard").to_pylist(), dtype=object)
    rows = index.column("row").to_numpy()
    keys = np.asarray(index.column("key").to_pylist(), dtype=object)
    labels = np.asarray([-1 if label is None else label for label in index.column("label").to_pylist()], dtype=np.int64)
    return [
        _ShardUnit(shard, rows[mine], labels[mine], keys[mine]) for shard in shards for mine in [shard_of == shard.name]
    ]


def _derive_unit(unit: _ShardUnit, run: Run, shared: tuple[DerivePlan, str]) -> dict[str, Any]:
    """Derive one shard (here or as a Ray task) and write it; its marker, every skipped image listed, and the
    rows read."""
    plan, name = shared
    group = open_zarr(run.storage, mode="r+")
    arrays = {array: group[f"{DERIVED_GROUP}/{name}/{array}"] for array in ARRAYS}
    marker = _derive_shard(run, plan, name, unit.shard, arrays, unit.rows, unit.labels, unit.keys)
    return {**marker, "rows_read": len(unit.rows)}


def _derive_shard(
    run: Run,
    plan: DerivePlan,
    name: str,
    shard: ShardInfo,
    arrays: dict[str, zarr.Array],
    rows: np.ndarray,
    labels: np.ndarray,
    keys: np.ndarray,
) -> dict[str, Any]:
    """Derive one shard's block in steps of whole chunks, then write its statistics and, last, its marker."""
    from cdam_worker.derive.compute import derive_rows

    rows_per_shard = int(run.attrs["rows_per_shard"])
    first = shard.index * rows_per_shard
    n_slots = plan.n_slots
    gh, gw = run.grid
    hashes = {array: hashlib.sha256() for array in ARRAYS}
    tables, skipped = [], []
    key_of = dict(zip(rows.tolist(), keys.tolist()))
    for start in range(first, first + rows_per_shard, READ_ROWS):
        stop = min(start + READ_ROWS, first + rows_per_shard)
        block = {
            "cdam": np.full((stop - start, n_slots, gh, gw), FLOAT_FILL, dtype=arrays["cdam"].dtype),
            "target_class": np.full((stop - start, n_slots), INT_FILL, dtype=np.int32),
        }
        inside = (rows >= start) & (rows < stop)
        if inside.any():
            part = derive_rows(run, plan, rows[inside], labels[inside])
            local = part.rows[part.derived] - start
            block["cdam"][local] = part.maps[part.derived]
            block["target_class"][local] = part.target_class[part.derived]
            skipped += [f"{key_of[row]}: {reason}" for row, reason in part.skipped.items()]
            if part.derived.any():
                for array in ARRAYS:
                    arrays[array][start:stop] = block[array]
                tables.append(_statistics(plan, shard, part, key_of))
        for array in ARRAYS:
            hashes[array].update(np.ascontiguousarray(block[array]).tobytes())
    table = pa.concat_tables(tables) if tables else DERIVED_METADATA_SCHEMA.empty_table()
    checksums = {array: digest.hexdigest() for array, digest in hashes.items()}
    checksums["metadata"] = _put_table(run.storage, derived_table_path(name, shard.index, shard.name), table)
    marker = {
        "shard": shard.name,
        "shard_index": shard.index,
        "n_images": table.num_rows,
        "n_skipped": len(skipped),
        "skipped": skipped[:SKIPPED_LISTED],
        "rows_checked": rows_per_shard,
        "checksums": checksums,
    }
    write_json(run.storage, derived_marker_path(name, shard.index), marker)
    return {**marker, "skipped": skipped}


def _statistics(plan: DerivePlan, shard: ShardInfo, part: DerivedRows, key_of: dict[int, str]) -> pa.Table:
    """One row per derived image: its slots and their positive and negative sums and argmax (as ``metadata/``)."""
    rows = part.rows[part.derived]
    flat = part.maps[part.derived].reshape(len(rows), plan.n_slots, -1)
    target_class = part.target_class[part.derived]
    return pa.table(
        {
            "key": [key_of[row] for row in rows.tolist()],
            "shard": [shard.name] * len(rows),
            "shard_index": np.full(len(rows), shard.index, dtype=np.int32),
            "row": rows,
            "targets": target_class.tolist(),
            "target_names": plan.slot_names(target_class),
            "relevance_pos_sum": np.clip(flat, 0, None).sum(2).tolist(),
            "relevance_neg_sum": np.clip(flat, None, 0).sum(2).tolist(),
            "relevance_argmax": flat.argmax(2).astype(np.int32).tolist(),
        },
        schema=DERIVED_METADATA_SCHEMA,
    )


def _put_table(storage: Storage, path: str, table: pa.Table) -> str:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    data = sink.getvalue()
    storage.put(path, data)
    return hashlib.sha256(data).hexdigest()


def _finish(run: Run, name: str, settings: dict[str, Any]) -> str:
    """Write the combined statistics and the manifest from the shards' markers; returns the status."""
    storage = run.storage
    root = derived_root(name)
    markers = [
        marker for s in run.shards if (marker := read_json(storage, derived_marker_path(name, s.index))) is not None
    ]
    tables = [
        pq.read_table(io.BytesIO(storage.get(derived_table_path(name, m["shard_index"], m["shard"])))) for m in markers
    ]
    table = pa.concat_tables(tables).sort_by("row") if tables else DERIVED_METADATA_SCHEMA.empty_table()
    metadata_checksum = _put_table(storage, f"{root}/metadata.parquet", table)
    status = "complete" if len(markers) == len(run.shards) else "partial"
    write_json(
        storage,
        derived_manifest_path(name),
        {
            "status": status,
            "fingerprint": fingerprint(settings),
            "settings": settings,
            "shards": [
                {key: m[key] for key in ("shard", "shard_index", "n_images", "n_skipped", "checksums")} for m in markers
            ],
            "totals": {"images": sum(m["n_images"] for m in markers), "skipped": sum(m["n_skipped"] for m in markers)},
            "metadata_checksum": metadata_checksum,
        },
    )
    return status


def verify_derived(
    storage: Storage, group: zarr.Group, settings_shards: list[dict[str, Any]], rows_per_shard: int, completed: set[int]
) -> list[str]:
    """Every problem of the run's derivations (``cdam verify``): markers of the run's completed shards,
    block and table checksums, row counts, the combined table and the manifest."""
    names = sorted({path.split("/")[1] for path in storage.list(DERIVED_GROUP) if path.count("/") >= 2})
    problems = []
    for name in names:
        root = derived_root(name)
        manifest = read_json(storage, derived_manifest_path(name))
        if manifest is None:
            problems.append(
                f"derived {name}: no manifest.json (a first `cdam derive --name {name}` was cut off; rerun it)"
            )
            continue
        if manifest.get("fingerprint") != fingerprint(manifest.get("settings", {})):
            problems.append(
                f"derived {name}: manifest fingerprint does not match its settings (the manifest was edited)"
            )
        if manifest.get("status") == "running":
            problems.append(
                f"derived {name}: status is 'running' (cut off, or still running: rerun the same `cdam derive`)"
            )
        total = 0
        for entry in settings_shards:
            index = int(entry["index"])
            marker = read_json(storage, derived_marker_path(name, index))
            if marker is None:
                if index in completed:
                    problems.append(
                        f"derived {name}: shard {index} is not derived (rerun the same `cdam derive` to finish it)"
                    )
                continue
            total += marker["n_images"]
            problems += [
                f"derived {name}: shard {marker['shard']}: {p}"
                for p in _check_shard(storage, group, name, marker, index * rows_per_shard)
            ]
        metadata = read_checked_table(
            storage, f"{root}/metadata.parquet", manifest.get("metadata_checksum"), problems, f"derived {name}: "
        )
        if metadata is not None and manifest.get("status") != "running" and metadata.num_rows != total:
            problems.append(
                f"derived {name}: metadata.parquet has {metadata.num_rows} rows, the shards' markers {total}"
            )
    return problems


def _check_shard(storage: Storage, group: zarr.Group, name: str, marker: dict[str, Any], first_row: int) -> list[str]:
    problems: list[str] = []
    span = f"rows {first_row}..{first_row + marker['rows_checked'] - 1}"
    for array in ARRAYS:
        try:
            actual = block_checksums(group, first_row, marker["rows_checked"], [f"{DERIVED_GROUP}/{name}/{array}"])
        except Exception as error:  # noqa: BLE001 - a damaged or missing chunk is a problem to list, not a crash
            problems.append(f"Zarr array 'derived/{name}/{array}' {span} cannot be read ({type(error).__name__})")
            continue
        if next(iter(actual.values())) != marker["checksums"].get(array):
            problems.append(f"Zarr array 'derived/{name}/{array}' {span} do not match their checksum")
    path = derived_table_path(name, marker["shard_index"], marker["shard"])
    table = read_checked_table(storage, path, marker["checksums"].get("metadata"), problems)
    if table is not None and table.num_rows != marker["n_images"]:
        problems.append(f"{path} has {table.num_rows} rows, the marker says {marker['n_images']} images")
    return problems
