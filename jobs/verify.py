"""``cdam verify DEST``: check that a finished output is complete and consistent.

Checks: the manifest is complete and its fingerprint matches its settings; every shard has a marker
whose counts agree with the manifest (per shard and in total); each shard's Zarr block and Parquet
files hash to the checksums recorded; every metadata row's Zarr row is written (not fill values);
keys are unique; the members table (where a shard's files lie in it) holds every explained key; Parquet
row counts match the markers; every sample of a shard is either explained (one metadata row, at its own
row) or in errors/, exactly once. Maps derived by ``cdam derive``
(``derived/NAME``) are checked the same way: markers, block and table checksums, row counts.
"""

from __future__ import annotations

import numpy as np

from cdam_worker.derive import verify_derived
from cdam_worker.run_files import block_checksums, open_zarr, read_checked_table, read_json
from cdam_worker.storage import Storage
from schemas import array_specs
from schemas.manifest import ShardSummary, count_mismatch_reason, fingerprint
from schemas.paths import ERRORS_DIR, MANIFEST_PATH, MEMBERS_DIR, METADATA_DIR, marker_path, shard_table_path


def verify_output(url: str) -> list[str]:
    """Every problem found in the output at ``url`` (an empty list means it verified)."""
    storage = Storage.from_url(url)
    manifest = read_json(storage, MANIFEST_PATH)
    if manifest is None:
        return [f"{storage.url}: no {MANIFEST_PATH} (not a cdam output, or the run never started)"]
    problems = []
    if manifest.get("status") != "complete":
        problems.append(f"manifest status is {manifest.get('status')!r}, not 'complete' (rerun the job to finish it)")
    if manifest.get("fingerprint") != fingerprint(manifest["settings"]):
        problems.append("manifest fingerprint does not match its settings (the manifest was edited)")
    group = open_zarr(storage, mode="r")
    names = [spec.name for spec in array_specs(bool(manifest["layout"]["store_basis"]))]
    rows_per_shard = int(manifest["layout"]["rows_per_shard"])
    recorded = {s["index"]: s for s in manifest["shards"]}
    seen_keys: dict[str, str] = {}
    completed: set[int] = set()  # shards with a completion marker
    totals = {"images": 0, "errors": 0}
    for entry in manifest["settings"]["shards"]:
        index = entry["index"]
        marker = read_json(storage, marker_path(index))
        if marker is None:
            problems.append(f"shard {index}: no completion marker")
            continue
        completed.add(index)
        summary = ShardSummary.from_marker(marker)
        totals["images"] += summary.n_images
        totals["errors"] += summary.n_errors
        problems += [
            f"shard {summary.shard}: {p}"
            for p in _check_shard(storage, group, names, summary, rows_per_shard, entry, recorded.get(index), seen_keys)
        ]
    complete = not any(problem.endswith(": no completion marker") for problem in problems)
    for name, count in manifest.get("totals", {}).items():
        if complete and name in totals and count != totals[name]:
            problems.append(f"manifest totals say {count} {name}, the shards' markers {totals[name]}")
    problems += verify_derived(storage, group, manifest["settings"]["shards"], rows_per_shard, completed)
    return problems


def _check_shard(
    storage,
    group,
    names,
    summary: ShardSummary,
    rows_per_shard: int,
    planned: dict,
    recorded: dict | None,
    seen_keys: dict[str, str],
) -> list[str]:
    problems = []
    if recorded is not None:
        for count in ("n_samples", "n_images", "n_errors"):
            if count in recorded and recorded[count] != getattr(summary, count):
                problems.append(f"manifest records {recorded[count]} {count[2:]}, the marker {getattr(summary, count)}")
        if recorded.get("checksums", summary.checksums) != summary.checksums:
            problems.append("marker checksums differ from those the manifest recorded")
    first_row = summary.shard_index * rows_per_shard
    span = f"rows {first_row}..{first_row + summary.rows_checked - 1}"
    for name in names:
        try:
            actual = block_checksums(group, first_row, summary.rows_checked, [name])[name]
        except Exception as error:  # noqa: BLE001 - a damaged chunk object is a problem to list, not a crash
            problems.append(f"Zarr array {name!r} {span} cannot be read ({type(error).__name__})")
            continue
        if actual != summary.checksums.get(name):
            problems.append(f"Zarr array {name!r} {span} do not match their checksum")
    metadata_path, errors_path, members_path = (
        shard_table_path(folder, summary.shard_index, summary.shard)
        for folder in (METADATA_DIR, ERRORS_DIR, MEMBERS_DIR)
    )
    table = read_checked_table(storage, metadata_path, summary.checksums.get("metadata"), problems)
    if table is not None:
        if table.num_rows != summary.n_images:
            problems.append(f"metadata has {table.num_rows} rows, marker says {summary.n_images} images")
        rows = np.asarray(table.column("row").to_pylist(), dtype=np.int64)
        outside = rows[(rows < first_row) | (rows >= first_row + rows_per_shard)]
        beyond = rows[(rows >= first_row + summary.n_samples) & (rows < first_row + rows_per_shard)]
        values, counts = np.unique(rows, return_counts=True)
        if (repeated := values[counts > 1]).size:
            problems.append(f"metadata rows {repeated[:5].tolist()} appear more than once")
        if beyond.size:
            problems.append(f"metadata rows {beyond[:5].tolist()} lie beyond the shard's {summary.n_samples} samples")
        if outside.size:
            problems.append(f"metadata rows {outside[:5].tolist()} lie outside the shard's block")
        elif rows.size:
            try:
                written = ~np.isnan(group["embedding"].get_orthogonal_selection((rows, slice(0, 1)))[:, 0])
            except Exception:  # noqa: BLE001 - already listed as an unreadable array
                written = np.ones(rows.shape, dtype=bool)
            for bad in rows[~written][:5].tolist():
                problems.append(f"metadata row {bad} points at unwritten Zarr data")
        duplicates: dict[str, list[str]] = {}
        for key in table.column("key").to_pylist():
            if key in seen_keys:
                duplicates.setdefault(seen_keys[key], []).append(key)
            seen_keys[key] = summary.shard
        for other, keys in duplicates.items():
            problems.append(
                f"key {keys[0]!r} also in shard {other}"
                + (f" (and {len(keys) - 1} more keys)" if len(keys) > 1 else "")
            )
    errors = (
        read_checked_table(storage, errors_path, summary.checksums.get("errors"), problems)
        if summary.n_errors
        else None
    )
    if errors is not None:
        if errors.num_rows != summary.n_errors:
            problems.append(f"errors has {errors.num_rows} rows, marker says {summary.n_errors}")
        if errors.column("key").null_count != summary.n_shard_errors:
            problems.append(
                f"errors has {errors.column('key').null_count} shard-level rows, marker says {summary.n_shard_errors}"
            )
    reasons = errors.column("reason").to_pylist() if errors is not None else []
    if (
        summary.n_samples != planned["n_samples"]
        and count_mismatch_reason(summary.n_samples, planned["n_samples"]) not in reasons
    ):
        problems.append(
            f"marker counts {summary.n_samples} samples, manifest plans {planned['n_samples']} (and errors/ does not say why)"
        )
    if "members" in summary.checksums:  # where the shard's files lie in it (uncompressed shards; older runs have none)
        members = read_checked_table(storage, members_path, summary.checksums["members"], problems)
        if (
            members is not None
            and table is not None
            and (missing := set(table.column("key").to_pylist()) - set(members.column("key").to_pylist()))
        ):
            problems.append(f"{members_path} lacks {len(missing)} explained key(s), e.g. {sorted(missing)[0]!r}")
    if unaccounted := summary.unaccounted():  # the tables agree with these counts, or a problem is listed above
        problems.append(f"{unaccounted} (each sample must be explained or in errors/, exactly once)")
    return problems
