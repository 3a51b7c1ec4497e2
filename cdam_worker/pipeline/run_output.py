"""The run's output as a whole: created or checked for a resume before the actors start, its manifest
completed at the end, and a shard the job gave up on recorded in errors/ (the actors write everything else)."""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cdam_worker import __version__
from cdam_worker.pipeline.plan import ConfigError, Plan
from cdam_worker.pipeline.settings import ShardTask
from cdam_worker.pipeline.sinks import create_zarr
from cdam_worker.run_files import read_json, write_json
from schemas import ERRORS_SCHEMA
from schemas.manifest import MANIFEST_FORMAT, ShardSummary, fingerprint, settings_difference
from schemas.paths import ERRORS_DIR, MANIFEST_PATH, OUTPUT_PREFIXES, marker_path, shard_table_path


def prepare_output(plan: Plan, overwrite: bool) -> list[ShardTask]:
    """Create or check the output; return the shards that still need work."""
    storage = plan.storage
    manifest = read_json(storage, MANIFEST_PATH)
    if manifest is not None and overwrite:
        for prefix in OUTPUT_PREFIXES:
            for path in storage.list(prefix):
                storage.delete(path)
        manifest = None
    if manifest is None:
        if any(storage.list(prefix) for prefix in OUTPUT_PREFIXES[:-1]):
            raise ConfigError(
                f"output {storage.url} holds files of an unfinished or foreign run without a manifest; use --overwrite to replace them"
            )
        create_zarr(
            storage,
            plan.layout,
            plan.zarr_attributes,
            head=_linear_head(plan.loaded.model) if plan.layout.store_basis else None,
        )
        write_json(storage, MANIFEST_PATH, _manifest(plan, status="running"))
        return list(plan.shards)
    if manifest.get("fingerprint") != fingerprint(plan.settings):
        differs = settings_difference(manifest.get("settings", {}), plan.settings)
        raise ConfigError(
            f"output {storage.url} was made with different settings ({differs}); use another --output or --overwrite"
        )
    done = {t.shard_index for t in plan.shards if storage.exists(marker_path(t.shard_index))}
    return [t for t in plan.shards if t.shard_index not in done]


def _manifest(plan: Plan, status: str, shards: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "cdam_version": __version__,
        "status": status,
        "fingerprint": fingerprint(plan.settings),
        "settings": plan.settings,
        "model_source": dataclasses.asdict(plan.config.model),  # how to load the model again (cdam evaluate, derive)
        "layout": {
            "rows_per_shard": plan.layout.rows_per_shard,
            "n_targets": plan.layout.n_targets,
            "grid": list(plan.layout.grid),
            "maps_dtype": plan.layout.maps_dtype,
            "store_basis": plan.layout.store_basis,
        },
        "shards": shards
        if shards is not None
        else [{"index": t.shard_index, "name": t.name, "url": t.url, "n_samples": t.n_samples} for t in plan.shards],
    }


def _linear_head(model: torch.nn.Module) -> tuple[Any, Any] | None:
    """(weight (C, D), bias (C)) as numpy of a head that is one linear layer on the pre-logits feature, else None."""
    head = getattr(model, "head", None)
    if not isinstance(head, torch.nn.Linear):
        return None
    bias = head.bias if head.bias is not None else head.weight.new_zeros(head.out_features)
    return head.weight.detach().float().cpu().numpy(), bias.detach().float().cpu().numpy()


def run_complete(plan: Plan) -> bool:
    """Whether the run's manifest says it is complete (every shard written and checked for duplicate keys)."""
    manifest = read_json(plan.storage, MANIFEST_PATH)
    return manifest is not None and manifest.get("status") == "complete"


def collect_markers(plan: Plan) -> dict[int, ShardSummary]:
    summaries = {}
    for task in plan.shards:
        marker = read_json(plan.storage, marker_path(task.shard_index))
        if marker is not None:
            summaries[task.shard_index] = ShardSummary.from_marker(marker)
    return summaries


def finish_manifest(plan: Plan, summaries: dict[int, ShardSummary], timings: dict[str, float]) -> None:
    """The manifest of a complete run: every shard's summary, the totals, and ``timings`` (seconds per phase of
    the command that completed it; the only field that differs between two runs of the same settings)."""
    shards = [s.manifest_entry() for s in sorted(summaries.values(), key=lambda s: s.shard_index)]
    manifest = _manifest(plan, status="complete", shards=shards)
    manifest["totals"] = {
        "images": sum(s.n_images for s in summaries.values()),
        "errors": sum(s.n_errors for s in summaries.values()),
    }
    manifest["timings"] = timings
    write_json(plan.storage, MANIFEST_PATH, manifest)


def write_shard_failure(plan: Plan, task: ShardTask, reason: str) -> None:
    """Record a shard given up on as one shard-level row (key null) of its errors/ table."""
    table = pa.Table.from_pylist(
        [
            {
                "shard": task.name,
                "shard_index": task.shard_index,
                "key": None,
                "reason": reason,
                "run_id": plan.config.run_id,
            }
        ],
        schema=ERRORS_SCHEMA,
    )
    sink = io.BytesIO()
    pq.write_table(table, sink)
    plan.storage.put(shard_table_path(ERRORS_DIR, task.shard_index, task.name), sink.getvalue())
