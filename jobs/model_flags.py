"""The model flags of ``cdam explain``, for reading commands that need the run's model again (derive, evaluate).

Without them the model is loaded from the run's manifest (where its checkpoint still is); either way it
must be the model the run was made with (``Run.load_model`` checks the checkpoint's sha256).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing cdam_worker loads torch: not at parser construction (cdam --help stays fast)
    from schemas.manifest import ModelSpec


def add_model_flags(parser: argparse.ArgumentParser, needed_for: str | None = None) -> argparse._ArgumentGroup:
    """Add ``--model``, ``--model-kwargs``, ``--pretrained``, ``--checkpoint``, ``--head-checkpoint`` as a group
    (returned, for more flags); ``needed_for`` says, for a reading command, why it needs the run's model."""
    description = (
        f"the model the run was made with, {needed_for}; by default as the run's manifest records it (if its checkpoint file is still there)"
        if needed_for
        else None
    )
    group = parser.add_argument_group("model", description)
    group.add_argument(
        "--model",
        metavar="NAME",
        help="timm model name (optional with a checkpoint made by cdam); hf:FOLDER (a transformers save_pretrained folder: "
        "config.json, safetensors, preprocessor_config.json) or hf:ORG/NAME (the Hugging Face Hub) for transformers ViT, DeiT, "
        "DINOv2 and CLIP; open_clip:ARCH with --checkpoint FILE, or open_clip:ARCH@TAG for its pretrained weights",
    )
    group.add_argument(
        "--model-kwargs", metavar="JSON", help="keyword arguments for timm.create_model, e.g. '{\"img_size\": 224}'"
    )
    weights = group.add_mutually_exclusive_group()
    weights.add_argument(
        "--pretrained",
        action="store_true",
        help="timm's pretrained weights, downloaded from the Hugging Face Hub on first use (needs a network or a warm cache; HF_HUB_OFFLINE=1 fails at once instead of retrying)",
    )
    weights.add_argument(
        "--checkpoint", metavar="FILE", help="a state dict of the timm model, or a checkpoint saved by cdam"
    )
    group.add_argument(
        "--head-checkpoint",
        metavar="FILE",
        help="a linear head (weight (C, D), bias (C)) put on the backbone's features",
    )
    return group


def spec_from_flags(args: argparse.Namespace) -> ModelSpec:
    """The model the flags name (checkpoint paths made absolute); ValueError, one line, for bad --model-kwargs."""
    from schemas.manifest import ModelSpec

    try:
        kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    except json.JSONDecodeError as error:
        raise ValueError(f"--model-kwargs is not valid JSON: {error}") from None
    if not isinstance(kwargs, dict):
        raise ValueError("--model-kwargs must be a JSON object, e.g. '{\"img_size\": 224}'")
    absolute = lambda path: str(Path(path).resolve()) if path else None
    name = args.model
    if name and name.startswith("hf:") and Path(name[3:]).expanduser().is_dir():  # a local folder, not a hub name
        name = "hf:" + str(Path(name[3:]).expanduser().resolve())
    return ModelSpec(name, kwargs, args.pretrained, absolute(args.checkpoint), absolute(args.head_checkpoint))


def model_spec(args: argparse.Namespace) -> ModelSpec | None:
    """For a reading command: the model the flags name, or None when none is given (then the manifest's is used)."""
    from cdam_worker.reading import RunError

    if not (args.model or args.checkpoint or args.pretrained or args.head_checkpoint):
        return None
    try:
        return spec_from_flags(args)
    except ValueError as error:
        raise RunError(str(error)) from None


def add_address_flag(parser: argparse.ArgumentParser, unit: str) -> None:
    """``--address``: the Ray cluster a reading command runs its units of work on (``unit``: what one task does)."""
    parser.add_argument(
        "--address",
        help=f"Ray cluster to run on as tasks, {unit} (default: RAY_ADDRESS; neither: in this process)",
    )
