"""What to explain: class targets (explicit, top-k, ground-truth label, all) and concept vectors.

A *target slot* is one map per image. Class slots come first, concept slots after them;
``target_class`` holds the class index of each slot, -1 for concepts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from cdam_worker.class_names import resolve_class

Similarity = Literal["dot", "cosine"]


@dataclass(frozen=True)
class TargetSpec:
    """The class targets of a run, the same rule for every image.

    ``classes:3,7,zebra`` (fixed classes), ``topk:5`` (each image's top predictions),
    ``label`` (each image's ground-truth class), ``all`` (every class), or ``none`` (concepts only).
    """

    kind: Literal["classes", "topk", "label", "all", "none"]
    classes: tuple[int, ...] = ()
    k: int = 0

    @classmethod
    def parse(cls, text: str, class_names: list[str]) -> "TargetSpec":
        """Parse a ``--targets`` string; class names resolve against ``class_names``."""
        kind, _, arg = text.strip().partition(":")
        kind = kind.strip().lower()
        if kind == "topk":
            if not arg.strip().isdigit() or int(arg) < 1:
                raise ValueError(f"--targets {text!r}: topk needs a positive integer, e.g. topk:5")
            k = int(arg)
            if k > len(class_names):
                raise ValueError(f"--targets {text!r}: k={k} exceeds the model's {len(class_names)} classes")
            return cls("topk", k=k)
        if kind == "classes":
            names = [part for part in arg.split(",") if part.strip()]
            if not names:
                raise ValueError(f"--targets {text!r}: give at least one class, e.g. classes:3,7 or classes:zebra")
            try:
                return cls("classes", classes=tuple(resolve_class(name.strip(), class_names) for name in names))
            except ValueError as error:
                raise ValueError(f"--targets {text!r}: {error}") from None
        if kind in ("label", "all", "none") and not arg:
            return cls(kind)
        raise ValueError(f"--targets {text!r}: expected topk:K, label, classes:A,B,..., all or none")

    def num_slots(self, num_classes: int) -> int:
        return {"classes": len(self.classes), "topk": self.k, "label": 1, "all": num_classes, "none": 0}[self.kind]

    def __str__(self) -> str:
        if self.kind == "classes":
            return "classes:" + ",".join(map(str, self.classes))
        return f"topk:{self.k}" if self.kind == "topk" else self.kind

    def resolve(self, logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The (B, K) class index of every slot for a batch with these ``logits`` (and ``labels``)."""
        batch, num_classes = logits.shape
        device = logits.device
        if self.kind == "topk":
            return logits.topk(self.k, dim=1).indices
        if self.kind == "classes":
            return torch.tensor(self.classes, device=device).expand(batch, -1)
        if self.kind == "all":
            return torch.arange(num_classes, device=device).expand(batch, -1)
        if self.kind == "none":
            return torch.empty(batch, 0, dtype=torch.long, device=device)
        if labels is None:
            raise ValueError("targets 'label' need a ground-truth label per image")
        labels = torch.as_tensor(labels, device=device).long().reshape(batch, 1)
        if ((labels < 0) | (labels >= num_classes)).any():
            raise ValueError(f"labels must lie in 0..{num_classes - 1}; got {labels.flatten().tolist()}")
        return labels


@dataclass(frozen=True)
class Concept:
    """A concept target: score = ``h . vector`` (dot, the paper's choice) or cos(h, vector)."""

    name: str
    vector: torch.Tensor
    similarity: Similarity = "dot"

    def __post_init__(self) -> None:
        if self.vector.ndim != 1:
            raise ValueError(f"concept {self.name!r}: vector must be 1-D, got shape {tuple(self.vector.shape)}")
        if self.similarity not in ("dot", "cosine"):
            raise ValueError(f"concept {self.name!r}: similarity must be 'dot' or 'cosine', not {self.similarity!r}")

    def save(self, path: str | Path) -> None:
        torch.save(
            {"name": self.name, "vector": self.vector.detach().cpu().float(), "similarity": self.similarity}, path
        )

    @classmethod
    def load(cls, path: str | Path, name: str | None = None) -> "Concept":
        """Load a concept saved by :meth:`save` (or a bare 1-D tensor file), weights-only."""
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(payload, torch.Tensor):
            return cls(name or Path(path).stem, payload.float())
        if not isinstance(payload, dict) or not isinstance(payload.get("vector"), torch.Tensor):
            raise ValueError(f"concept file {path} holds neither a 1-D tensor nor a saved Concept")
        return cls(
            name or payload.get("name") or Path(path).stem, payload["vector"].float(), payload.get("similarity", "dot")
        )


def concept_directions(concepts: tuple[Concept, ...], embedding: torch.Tensor) -> torch.Tensor:
    """The gradient of each concept score with respect to the embedding: (B, Kc, D)."""
    if not concepts:
        return embedding.new_zeros(embedding.shape[0], 0, embedding.shape[1])
    vectors = torch.stack([c.vector.to(embedding) for c in concepts])  # (Kc, D)
    directions = vectors.expand(embedding.shape[0], -1, -1).clone()
    cosine = torch.tensor([c.similarity == "cosine" for c in concepts], device=embedding.device)
    if cosine.any():
        h_norm = embedding.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (B, 1)
        h_unit = embedding / h_norm
        v_unit = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)
        cos = h_unit @ v_unit.T  # (B, Kc)
        grad_cos = (v_unit[None] - cos[..., None] * h_unit[:, None]) / h_norm[..., None]
        directions = torch.where(cosine[None, :, None], grad_cos, directions)
    return directions


def concept_scores(concepts: tuple[Concept, ...], embedding: torch.Tensor) -> torch.Tensor:
    """Each concept's score for each image: (B, Kc)."""
    if not concepts:
        return embedding.new_zeros(embedding.shape[0], 0)
    vectors = torch.stack([c.vector.to(embedding) for c in concepts])
    dots = embedding @ vectors.T
    cosine = torch.tensor([c.similarity == "cosine" for c in concepts], device=embedding.device)
    norms = embedding.norm(dim=1, keepdim=True).clamp_min(1e-12) * vectors.norm(dim=1).clamp_min(1e-12)
    return torch.where(cosine[None], dots / norms, dots)
