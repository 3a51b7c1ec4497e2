"""Classes of interest written as text, for CLIP-style models (transformers ``CLIPModel``, open_clip).

- Concepts: ``--concepts NAME=text:"a photo of a watermark"`` or ``NAME=prompts:FILE`` (one prompt a line). The
  concept vector is CLIP's zero-shot recipe: each prompt's text embedding normalised, averaged, normalised
  again. It lives in the image embedding's space; score by dot (default) or cosine (``:cosine``).
- Zero-shot targets: ``--targets text:FILE`` (or ``text:FILE:K`` for the top K, default 5): one class a line,
  ``NAME`` (prompted as "a photo of a NAME.") or ``NAME: prompt | prompt | ...``. The model gets a head
  :class:`ZeroShotHead` whose logits are CLIP's, ``logit_scale * cos(image embedding, class embedding)``; the
  head normalises the embedding, so those maps take the autograd path, exact.

The text tower is reached through ``model.text_tower`` (a :class:`TextTower`), set by the loaders of those
models; it loads the text side on first use and pickles as its recipe only, so actors never carry it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CLASS_TEMPLATE = "a photo of a {}."
DEFAULT_ZERO_SHOT_K = 5
TextSide = tuple[Callable[[list[str]], torch.Tensor], float]  # (encode: prompts -> (P, E) embeddings, logit scale)


class TextError(ValueError):
    """A text concept or zero-shot class file that cannot be used (one line naming it)."""


class TextTower:
    """The text side of a CLIP model: ``encode(prompts) -> (P, E)`` and ``logit_scale``, loaded on first use.

    ``load()`` returns ``(encode, logit_scale)``; it must pickle (a ``functools.partial`` of a module function).
    """

    def __init__(self, load: Callable[[], TextSide], source: str, loaded: TextSide | None = None) -> None:
        self._load = load
        self.source = source
        self._loaded = loaded  # the side already at hand (the loader's own model), else loaded on first use

    def __getstate__(self) -> dict[str, Any]:
        return {"_load": self._load, "source": self.source, "_loaded": None}

    def _side(self) -> TextSide:
        if self._loaded is None:
            self._loaded = self._load()
        return self._loaded

    @property
    def logit_scale(self) -> float:
        return self._side()[1]

    def direction(self, prompts: list[str]) -> torch.Tensor:
        """CLIP's zero-shot vector of several prompts: normalise each embedding, average, normalise (E,)."""
        embeddings = F.normalize(self._side()[0](list(prompts)).float(), dim=-1)
        return F.normalize(embeddings.mean(0), dim=0)


def text_tower_of(model: nn.Module, what: str) -> TextTower:
    tower = getattr(model, "text_tower", None)
    if tower is None:
        raise TextError(
            f"{what}: the model has no text tower (text needs a CLIP model with both towers: "
            "a transformers CLIPModel folder with its tokenizer, or open_clip:ARCH)"
        )
    return tower


class ZeroShotHead(nn.Module):
    """CLIP's zero-shot logits: ``logit_scale * normalize(h) @ classes.T`` for unit class embeddings (C, E)."""

    def __init__(self, classes: torch.Tensor, logit_scale: float) -> None:
        super().__init__()
        self.register_buffer("classes", classes.float())
        self.logit_scale = float(logit_scale)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * F.normalize(embedding, dim=-1) @ self.classes.T

    @property
    def out_features(self) -> int:
        return self.classes.shape[0]


# -- concepts ----------------------------------------------------------------------------------------


def is_text_source(source: str) -> bool:
    return source.startswith(("text:", "prompts:"))


def concept_prompts(name: str, source: str) -> list[str]:
    """The prompts of a concept source ``text:PROMPT`` or ``prompts:FILE``."""
    kind, _, value = source.partition(":")
    value = value.strip().strip('"').strip("'") if kind == "text" else value
    if kind == "text":
        if not value:
            raise TextError(f'--concepts {name}: empty prompt (text:"a photo of ...")')
        return [value]
    path = Path(value)
    if not path.is_file():
        raise TextError(f"--concepts {name}: prompts file {path} not found")
    prompts = [
        line.strip()
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not prompts:
        raise TextError(f"--concepts {name}: prompts file {path} holds no prompts (one a line)")
    return prompts


# -- zero-shot targets -------------------------------------------------------------------------------


def read_class_prompts(path: str | Path) -> dict[str, Any]:
    """``{"classes": [...], "prompts": [[...], ...]}`` from a class file: ``NAME`` or ``NAME: prompt | prompt`` a line."""
    path = Path(path)
    if not path.is_file():
        raise TextError(f"--targets text:{path}: class file not found")
    classes, prompts = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, written = line.partition(":")
        name = name.strip()
        own = [p.strip() for p in written.split("|") if p.strip()] if sep else []
        if not name or (sep and not own):
            raise TextError(f"{path}:{number}: expected NAME or NAME: prompt | prompt, got {line.strip()!r}")
        if name in classes:
            raise TextError(f"{path}:{number}: class {name!r} appears twice")
        classes.append(name)
        prompts.append(own or [CLASS_TEMPLATE.format(name)])
    if not classes:
        raise TextError(f"--targets text:{path}: the class file holds no classes")
    return {"classes": classes, "prompts": prompts}


def parse_zero_shot_targets(targets: str) -> tuple[dict[str, Any], str] | None:
    """For ``--targets text:FILE[:K]``: (the model's ``zero_shot`` setting, the class targets ``topk:K``); else None."""
    if not targets.strip().lower().startswith("text:"):
        return None
    value = targets.strip()[len("text:") :]
    match = re.fullmatch(r"(.+):(\d+)", value)
    path, k = (match.group(1), int(match.group(2))) if match and not Path(value).is_file() else (value, None)
    zero_shot = read_class_prompts(path)
    k = min(k or DEFAULT_ZERO_SHOT_K, len(zero_shot["classes"]))
    if k < 1:
        raise TextError(f"--targets {targets}: K must be at least 1")
    return zero_shot, f"topk:{k}"


def apply_zero_shot(loaded: Any, zero_shot: dict[str, Any]) -> Any:
    """``loaded`` (a LoadedModel) with a :class:`ZeroShotHead` over the classes of ``zero_shot`` (read_class_prompts)."""
    from cdam_worker.maps.model import ModelLoadError

    model = loaded.model
    try:
        tower = text_tower_of(model, f"--targets text: ({loaded.name})")
    except TextError as error:
        raise ModelLoadError(str(error)) from None
    classes = torch.stack([tower.direction(prompts) for prompts in zero_shot["prompts"]])
    model.head = ZeroShotHead(classes, tower.logit_scale)
    model.num_classes = classes.shape[0]
    loaded.class_names = list(zero_shot["classes"])
    loaded.model_kwargs = {
        "zero_shot": {"classes": list(zero_shot["classes"]), "prompts": [list(p) for p in zero_shot["prompts"]]}
    }
    return loaded
