"""A run's settings: the units of work (shards) and everything an actor needs to explain them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from schemas.manifest import ModelSpec


@dataclass(frozen=True)
class ConceptSpec:
    name: str
    vector: tuple[float, ...]
    similarity: str = "dot"


@dataclass(frozen=True)
class ShardTask:
    """One unit of work: a shard, its block of rows, and the keys to refuse as cross-shard duplicates (key -> the
    reason; found after the shards are written, see ``duplicate_keys.py``)."""

    shard_index: int
    url: str
    name: str
    n_samples: int
    duplicates: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class JobConfig:
    """Everything an actor needs; ``output_settings`` is what must match for a resume."""

    output: str
    model: ModelSpec
    model_identity: dict[str, Any]  # name, kwargs, checkpoint sha256s: what the fingerprint sees of the model
    class_names: tuple[str, ...]
    targets: str
    concepts: tuple[ConceptSpec, ...]
    variant: dict[str, Any]
    maps_dtype: str
    store_basis: bool
    batch_size: int  # 0: the actor's default (CPU_BATCH_SIZE on the CPU, the batch that fills the GPU on CUDA)
    method: str
    precision: str
    rows_per_shard: int
    require_label: bool
    run_id: str = ""  # the fingerprint's first 12 hex digits: a resumed run writes the same bytes
    decode: str = "cpu"  # "cpu" (Pillow + the timm transform, bit-reproducible) or "gpu" (nvJPEG, close to it)

    def output_settings(self, shards: list[ShardTask]) -> dict[str, Any]:
        """The settings that define the output's bytes: a resume must repeat them exactly."""
        return {
            "model": self.model_identity,
            "targets": self.targets,
            "concepts": [asdict(c) for c in self.concepts],
            "variant": self.variant,
            "maps_dtype": self.maps_dtype,
            "store_basis": self.store_basis,
            "method": self.method,
            "precision": self.precision,
            "rows_per_shard": self.rows_per_shard,
            "shards": [{"index": s.shard_index, "url": s.url, "n_samples": s.n_samples} for s in shards],
            **({"decode": self.decode} if self.decode != "cpu" else {}),  # GPU-decoded maps differ slightly
        }
