"""Loading timm Vision Transformers for CDAM: by name, from checkpoints, or backbone + linear head.

Every checkpoint is read with ``torch.load(..., weights_only=True)``: no pickle code runs.
A checkpoint written by :func:`save_checkpoint` records its architecture and class names, so it
loads from the file alone.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import timm
import torch
from timm.data import ImageNetInfo, create_transform, infer_imagenet_subset, resolve_model_data_config
from timm.models.vision_transformer import VisionTransformer

from cdam_worker.class_names import resolve_class

CHECKPOINT_FORMAT = "cdam-checkpoint/1"
EXTERNAL_PREFIXES = (
    "hf:",
    "open_clip:",
)  # --model hf:FOLDER|ORG/NAME (hf_models.py), open_clip:ARCH (open_clip_models.py)


class ModelLoadError(ValueError):
    """A model, checkpoint or head could not be loaded; the message names the culprit."""


@dataclass
class LoadedModel:
    """A ViT in eval mode with everything needed to explain it and to describe the run."""

    model: VisionTransformer
    transform: Callable[[Any], torch.Tensor]
    class_names: list[str]
    name: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint_sha256: str | None = None
    head_checkpoint_sha256: str | None = None
    data_config: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_index(self, name_or_index: str | int) -> int:
        """Resolve a class index or a class name ("zebra", "analog clock") to an index."""
        return resolve_class(name_or_index, self.class_names)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_class_names(model: torch.nn.Module, num_classes: int) -> list[str]:
    """ImageNet descriptions ("zebra") for ImageNet heads, else ``class_<i>``."""
    subset = infer_imagenet_subset(model) if num_classes in (1000, 11221, 21841, 21843, 22000) else None
    if subset is not None:
        info = ImageNetInfo(subset)
        if info.num_classes() == num_classes:
            return [info.index_to_description(i) for i in range(num_classes)]
    return [f"class_{i}" for i in range(num_classes)]


def save_checkpoint(
    path: str | Path, model: VisionTransformer, model_name: str, model_kwargs: dict[str, Any], class_names: list[str]
) -> None:
    """Save a self-describing checkpoint: architecture, class names and weights (loadable with weights_only)."""
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "model_name": model_name,
            "model_kwargs": dict(model_kwargs),
            "class_names": list(class_names),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        },
        path,
    )


def _read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure here is a bad file
        raise ModelLoadError(
            f"cannot read checkpoint {path} as a weights-only torch file: {_load_failure(error)}"
        ) from None
    if not isinstance(payload, dict):
        raise ModelLoadError(f"checkpoint {path} holds a {type(payload).__name__}, not a state dict")
    return payload


def _load_failure(error: Exception) -> str:
    """One clean line for a failed torch.load (torch's weights-only refusal is many lines with ANSI codes)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
    refused = next((line for line in lines if line.startswith("WeightsUnpickler error:")), None)
    if refused is not None:
        detail = refused[len("WeightsUnpickler error:") :].split(". Please use")[0].strip()
        return f"it holds pickled Python objects, which weights-only loading refuses ({detail})"
    first = next((line.split(". ")[0] for line in lines if line), "")
    return f"not a torch file, or a damaged one ({type(error).__name__}{': ' + first if first else ''})"


def _state_dict_of(payload: dict[str, Any]) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(payload.get(key), dict):
            payload = payload[key]
            break
    return {
        (k[len("module.") :] if k.startswith("module.") else k): v
        for k, v in payload.items()
        if isinstance(v, torch.Tensor)
    }


def _create(name: str, pretrained: bool, model_kwargs: dict[str, Any]) -> torch.nn.Module:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelLoadError(f"unknown timm model {name!r}{hint}")
    try:
        model = timm.create_model(name, pretrained=pretrained, **model_kwargs)
    except TypeError as error:
        raise ModelLoadError(f"bad keyword arguments for model {name!r}: {error}") from None
    except Exception as error:  # noqa: BLE001 - a download or a pretrained tag that failed: one line, not a traceback
        if not pretrained:
            raise
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        hint = (
            " (timm downloads them from the Hugging Face Hub on first use: check the network or the cache, or pass a checkpoint file instead)"
            if isinstance(error, OSError)  # network and cache errors
            else ""
        )
        raise ModelLoadError(
            f"cannot get pretrained weights for {name!r}: {type(error).__name__}: {reason}{hint}"
        ) from None
    if not isinstance(model, VisionTransformer):
        raise ModelLoadError(
            f"model {name!r} is a {type(model).__name__}, not a timm VisionTransformer: CDAM needs a ViT with blocks[-1].norm1"
        )
    return model


def _load_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str, name: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and state_dict[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:3])})")
        if mismatched:
            parts.append(f"shape mismatch in {len(mismatched)} tensors (e.g. {'; '.join(mismatched[:2])})")
        raise ModelLoadError(f"checkpoint {source} does not fit model {name!r}: {', '.join(parts)}")
    model.load_state_dict(state_dict, strict=True)


def _linear_head_of(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (weight, bias) of a linear-probe checkpoint: exactly one 2-D weight and at most one 1-D bias."""
    tensors = _state_dict_of(_read_checkpoint(path))
    weights = [v for k, v in tensors.items() if k.endswith("weight") and v.ndim == 2]
    biases = [v for k, v in tensors.items() if k.endswith("bias") and v.ndim == 1]
    if len(weights) != 1 or len(biases) > 1:
        raise ModelLoadError(
            f"head checkpoint {path} must hold one linear layer (a 2-D weight and a 1-D bias); found keys {sorted(tensors)[:6]}"
        )
    weight, bias = weights[0], (biases[0] if biases else None)
    if bias is not None and bias.shape[0] != weight.shape[0]:
        raise ModelLoadError(
            f"head checkpoint {path}: bias has {bias.shape[0]} entries but weight has {weight.shape[0]} rows"
        )
    return weight, bias


def _data_config(
    model: VisionTransformer, img_size: int | None, mean: tuple[float, ...] | None, std: tuple[float, ...] | None
) -> dict[str, Any]:
    config = resolve_model_data_config(model)
    if img_size is not None:
        config["input_size"] = (3, img_size, img_size)
    elif not getattr(model, "dynamic_img_size", False):
        height, width = model.patch_embed.img_size
        config["input_size"] = (3, height, width)
    if mean is not None:
        config["mean"] = tuple(mean)
    if std is not None:
        config["std"] = tuple(std)
    return config


def load_model(
    name: str | None = None,
    *,
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    head_checkpoint: str | Path | None = None,
    class_names: list[str] | None = None,
    img_size: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    device: str | torch.device = "cpu",
    **model_kwargs: Any,
) -> LoadedModel:
    """Load a timm ViT for CDAM and its evaluation transform.

    - ``name`` (+ ``pretrained=True`` for timm's weights, which needs a network);
    - ``checkpoint``: a state dict of the timm model (number of classes read from ``head.weight``) or a
      file from :func:`save_checkpoint` (then ``name`` may be omitted);
    - ``head_checkpoint``: a linear probe (``weight`` (C, D), ``bias`` (C)) put on the backbone's features;
    - ``model_kwargs`` pass to ``timm.create_model`` (``img_size``, ``patch_size``, ``depth``, ...).
    ``img_size`` sets the model's input size and the transform's (the transform's only for a
    ``dynamic_img_size`` model); ``mean``/``std`` override the transform only.
    """
    if name is not None and name.startswith(EXTERNAL_PREFIXES):
        return _load_external(
            name, pretrained, checkpoint, head_checkpoint, class_names, (img_size, mean, std), device, model_kwargs
        )
    checkpoint_sha = head_sha = None
    state_dict: dict[str, torch.Tensor] | None = None
    if checkpoint is not None:
        payload = _read_checkpoint(checkpoint)
        checkpoint_sha = file_sha256(checkpoint)
        if payload.get("format") == CHECKPOINT_FORMAT:
            if name is not None and name != payload["model_name"]:
                raise ModelLoadError(f"checkpoint {checkpoint} is for model {payload['model_name']!r}, not {name!r}")
            name = payload["model_name"]
            model_kwargs = {**payload["model_kwargs"], **model_kwargs}
            class_names = class_names or list(payload["class_names"])
        state_dict = _state_dict_of(payload)
        if "head.weight" in state_dict and "num_classes" not in model_kwargs:
            model_kwargs["num_classes"] = int(state_dict["head.weight"].shape[0])
    if img_size is not None and not model_kwargs.get("dynamic_img_size", False):
        model_kwargs["img_size"] = img_size  # the model's input size, not only the transform's
    if name is None:
        raise ModelLoadError("no model name given (and the checkpoint does not record one)")
    if pretrained and checkpoint is not None:
        raise ModelLoadError("give either pretrained=True or a checkpoint, not both")

    head = _linear_head_of(head_checkpoint) if head_checkpoint is not None else None
    if head is not None:
        head_sha = file_sha256(head_checkpoint)
        # a backbone checkpoint without head.* keys loads into a headless model; the probe is put on after
        model_kwargs.setdefault("num_classes", 0 if state_dict is not None else int(head[0].shape[0]))

    model = _create(name, pretrained, model_kwargs)
    if state_dict is not None:
        _load_weights(model, state_dict, str(checkpoint), name)
    if head is not None:
        weight, bias = head
        if weight.shape[1] != model.num_features:
            raise ModelLoadError(
                f"head checkpoint {head_checkpoint} takes {weight.shape[1]}-d features but model {name!r} gives {model.num_features}-d"
            )
        model.reset_classifier(int(weight.shape[0]))
        model_kwargs["num_classes"] = int(weight.shape[0])
        with torch.no_grad():
            model.head.weight.copy_(weight)
            if bias is not None:
                model.head.bias.copy_(bias)
            else:
                model.head.bias.zero_()

    model.eval().to(device)
    num_classes = int(getattr(model, "num_classes", 0))
    if class_names is None:
        class_names = default_class_names(model, num_classes)
    elif len(class_names) != num_classes:
        raise ModelLoadError(f"{len(class_names)} class names given for a model with {num_classes} classes")
    config = _data_config(model, img_size, mean, std)
    return LoadedModel(
        model=model,
        transform=create_transform(**config, is_training=False),
        class_names=list(class_names),
        name=name,
        model_kwargs=dict(model_kwargs),
        checkpoint_sha256=checkpoint_sha,
        head_checkpoint_sha256=head_sha,
        data_config=config,
    )


def _load_external(
    name: str, pretrained: bool, checkpoint, head_checkpoint, class_names, transform_overrides, device, model_kwargs
) -> LoadedModel:
    """A transformers or open_clip model converted into a timm ViT (their modules import those libraries)."""
    if any(value is not None for value in transform_overrides):
        raise ModelLoadError(
            f"--model {name}: the input size and normalisation come from the checkpoint; img_size, mean and std do not apply"
        )
    if name.startswith("hf:"):
        from cdam_worker.maps.hf_models import load_hf_model as load
    else:
        from cdam_worker.maps.open_clip_models import load_open_clip_model as load
    return load(
        name,
        pretrained=pretrained,
        checkpoint=checkpoint,
        head_checkpoint=head_checkpoint,
        class_names=class_names,
        device=device,
        **model_kwargs,
    )
