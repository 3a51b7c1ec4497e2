"""``manifest.json`` and ``markers/``: the run's settings, its fingerprint, how to load its model again, and what
each shard's completion marker records."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

MANIFEST_FORMAT = "cdam-run/1"


@dataclass(frozen=True)
class ModelSpec:
    """How every actor loads the model (the driver has already checked that it loads)."""

    name: str | None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False
    checkpoint: str | None = None
    head_checkpoint: str | None = None


@dataclass
class ShardSummary:
    """What a shard's completion marker records."""

    shard: str
    shard_index: int
    url: str
    n_samples: int
    n_images: int
    n_errors: int  # rows of errors/: samples, plus shard-level problems
    n_shard_errors: int  # rows of errors/ about the shard itself (key null)
    rows_checked: int  # rows from the block start covered by the array checksums
    checksums: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode()

    @classmethod
    def from_marker(cls, marker: dict[str, Any]) -> ShardSummary:
        """The summary a marker records; markers of cdam 0.1 have no ``n_shard_errors`` (read as 0)."""
        return cls(**{"n_shard_errors": 0, **marker})

    def manifest_entry(self) -> dict[str, Any]:
        """The shard's entry in the manifest's ``shards`` list."""
        return {
            "index": self.shard_index,
            "name": self.shard,
            "url": self.url,
            "n_samples": self.n_samples,
            "n_images": self.n_images,
            "n_errors": self.n_errors,
            "rows_checked": self.rows_checked,
            "checksums": self.checksums,
        }

    def unaccounted(self) -> str | None:
        """Why the shard's samples are not each either explained or in errors/ (None when they are)."""
        sample_errors = self.n_errors - self.n_shard_errors
        if self.n_images + sample_errors == self.n_samples:
            return None
        return f"{self.n_samples} samples planned, but {self.n_images} explained + {sample_errors} in errors/"


def count_mismatch_reason(held: int, planned: int) -> str:
    """The shard-level errors/ row of a shard whose tar holds another number of samples than its plan counted
    (its marker then records ``held``)."""
    return f"the tar holds {held} samples, but {planned} were planned (a wrong shard index entry, or the shard changed since it was counted)"


def fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def settings_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """A short description of which settings differ (for the 'refusing to resume' message)."""
    changed = sorted(key for key in set(old) | set(new) if old.get(key) != new.get(key))
    return ", ".join(changed) or "none"
