"""open_clip image towers for CDAM: ``--model open_clip:ARCH`` with ``--checkpoint FILE``, or ``open_clip:ARCH@TAG``.

``ARCH`` is a built-in open_clip model name (``ViT-B-32``) or a model config JSON file (its stem names it).
The image tower (``model.visual``, an open_clip ``VisionTransformer``) is copied into timm's
``VisionTransformer``: ``ln_pre`` is ``norm_pre``, ``ln_post`` the final norm, the projection sits after it in
timm's ``fc_norm`` slot, so the embedding is open_clip's ``encode_image`` and the closed form applies. The copy
is checked against ``encode_image`` on every load. The text tower stays with open_clip and is loaded again
only to encode text concepts or zero-shot class prompts (``text_concepts.TextTower``).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import torch
from timm.layers import QuickGELU
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from cdam_worker.maps.model import (
    LoadedModel,
    ModelLoadError,
    _read_checkpoint,
    _state_dict_of,
    file_sha256,
)

OPEN_CLIP_PREFIX = "open_clip:"
MATCH_TOLERANCE = 1e-4


def load_open_clip_model(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    head_checkpoint: Any = None,
    class_names: list[str] | None = None,
    device: str | torch.device = "cpu",
    zero_shot: dict | None = None,
    **model_kwargs: Any,
) -> LoadedModel:
    """The image tower of ``open_clip:ARCH`` (weights from ``checkpoint``, or ``open_clip:ARCH@TAG``) as a timm ViT."""
    from cdam_worker.maps.hf_models import eval_transform
    from cdam_worker.maps.text_concepts import TextTower, apply_zero_shot

    if head_checkpoint is not None or pretrained or model_kwargs:
        raise ModelLoadError(
            f"--model {name}: give the weights with --checkpoint FILE or as open_clip:ARCH@TAG; --pretrained, --head-checkpoint and --model-kwargs do not apply"
        )
    architecture, _, tag = name[len(OPEN_CLIP_PREFIX) :].partition("@")
    if tag and checkpoint is not None:
        raise ModelLoadError(f"--model {name}: give either a pretrained tag (@{tag}) or --checkpoint, not both")
    if not tag and checkpoint is None:
        raise ModelLoadError(
            f"--model {name}: needs its weights: --checkpoint FILE (a state dict of the open_clip model) or open_clip:{architecture}@TAG"
        )
    clip_model = create_open_clip(architecture, tag or None, str(checkpoint) if checkpoint is not None else None)
    model = convert_open_clip_visual(clip_model.visual)
    data_config = _data_config(clip_model.visual)
    check_conversion(clip_model, model, data_config["input_size"])
    recipe = functools.partial(
        open_clip_text_side, architecture, tag or None, str(checkpoint) if checkpoint is not None else None
    )
    model.text_tower = TextTower(recipe, name, loaded=text_side_of(clip_model, architecture))
    loaded = LoadedModel(
        model=model.eval().to(device),
        transform=eval_transform(data_config),
        class_names=list(class_names or []),
        name=name,
        model_kwargs={},
        checkpoint_sha256=file_sha256(checkpoint) if checkpoint is not None else None,
        data_config=data_config,
    )
    return apply_zero_shot(loaded, zero_shot) if zero_shot else loaded


def create_open_clip(architecture: str, tag: str | None, checkpoint: str | None) -> nn.Module:
    """The open_clip model ``architecture`` (a name or a config JSON file) with its weights, in eval mode."""
    try:
        import open_clip
    except ImportError:
        raise ModelLoadError(
            "--model open_clip:...: needs the open_clip_torch package (pip install 'cdam[clip]')"
        ) from None
    if architecture.endswith(".json"):
        path = Path(architecture)
        if not path.is_file():
            raise ModelLoadError(f"--model open_clip:{architecture}: config file not found")
        open_clip.add_model_config(path)
        architecture = path.stem
    if architecture not in open_clip.list_models():
        raise ModelLoadError(
            f"--model open_clip:{architecture}: unknown open_clip model (open_clip.list_models() lists them, or give a config .json)"
        )
    if tag is None:  # open_clip warns "No pretrained weights loaded" for a model whose weights come next
        logging.disable(logging.WARNING)
    try:
        model = open_clip.create_model(architecture, pretrained=tag, load_weights=tag is not None)
    except Exception as error:  # noqa: BLE001 - a download or an unknown tag: one line
        raise ModelLoadError(
            f"--model open_clip:{architecture}@{tag}: {type(error).__name__}: {str(error).strip().splitlines()[0]}"
        ) from None
    finally:
        logging.disable(logging.NOTSET)
    if checkpoint is not None:
        state_dict = _read_weights(checkpoint)
        try:
            missing, unexpected = model.load_state_dict(state_dict, strict=False)
        except RuntimeError as error:  # shape mismatches
            detail = next(
                (line.strip() for line in str(error).splitlines() if "size mismatch" in line),
                str(error).splitlines()[0],
            )
            raise ModelLoadError(f"checkpoint {checkpoint} does not fit open_clip {architecture}: {detail}") from None
        if missing or unexpected:
            raise ModelLoadError(
                f"checkpoint {checkpoint} does not fit open_clip {architecture}: missing {len(missing)} keys (e.g. {missing[:3]}), unexpected {len(unexpected)} (e.g. {unexpected[:3]})"
            )
    return model.float().eval()


def _read_weights(checkpoint: str) -> dict[str, torch.Tensor]:
    if checkpoint.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(checkpoint)
        except Exception as error:  # noqa: BLE001 - a damaged file
            raise ModelLoadError(
                f"cannot read checkpoint {checkpoint} as safetensors: {str(error).splitlines()[0]}"
            ) from None
    return _state_dict_of(_read_checkpoint(checkpoint))


def convert_open_clip_visual(visual: nn.Module) -> VisionTransformer:
    """timm's ViT with the weights of an open_clip ``VisionTransformer`` image tower (CLS pooling, LayerNorm blocks)."""
    if type(visual).__name__ != "VisionTransformer" or not hasattr(visual, "class_embedding"):
        raise ModelLoadError(
            f"the image tower is a {type(visual).__name__}: cdam explains open_clip ViT towers (VisionTransformer)"
        )
    if visual.attn_pool is not None or visual.pool_type != "tok":
        raise ModelLoadError(
            f"the image tower pools with {'attention' if visual.attn_pool is not None else visual.pool_type!r}; cdam needs CLS-token pooling ('tok')"
        )
    if isinstance(visual.ln_pre, nn.Identity):
        raise ModelLoadError("an image tower without ln_pre (no_ln_pre) is not supported")
    blocks = list(visual.transformer.resblocks)
    if any(type(block).__name__ != "ResidualAttentionBlock" or hasattr(block, "ln_1_kv") for block in blocks):
        raise ModelLoadError(
            f"the image tower's blocks are {type(blocks[0]).__name__}: cdam converts open_clip's ResidualAttentionBlock"
        )
    first = blocks[0]
    activation = (
        QuickGELU
        if type(first.mlp.gelu).__name__ == "QuickGELU"
        else nn.GELU
        if type(first.mlp.gelu) is nn.GELU
        else None
    )
    if activation is None:
        raise ModelLoadError(
            f"the image tower's activation {type(first.mlp.gelu).__name__} is not supported (GELU or QuickGELU)"
        )
    width, hidden = visual.class_embedding.shape[0], first.mlp.c_fc.out_features
    layer_scale = not isinstance(first.ls_1, nn.Identity)
    model = VisionTransformer(
        img_size=tuple(visual.image_size),
        patch_size=tuple(visual.patch_size),
        num_classes=0,
        global_pool="token",
        embed_dim=width,
        depth=len(blocks),
        num_heads=first.attn.num_heads,
        mlp_ratio=(hidden + 0.5) / width,
        qkv_bias=first.attn.in_proj_bias is not None,
        init_values=1.0 if layer_scale else None,
        pre_norm=True,
        norm_layer=functools.partial(nn.LayerNorm, eps=visual.ln_pre.eps),
        act_layer=activation,
        weight_init="skip",
    )
    state = {
        "cls_token": visual.class_embedding.view(1, 1, -1),
        "pos_embed": visual.positional_embedding[None],
        "patch_embed.proj.weight": visual.conv1.weight,
        "norm_pre.weight": visual.ln_pre.weight,
        "norm_pre.bias": visual.ln_pre.bias,
        "norm.weight": visual.ln_post.weight,
        "norm.bias": visual.ln_post.bias,
    }
    for index, block in enumerate(blocks):
        prefix = f"blocks.{index}."
        state.update(
            {
                prefix + "norm1.weight": block.ln_1.weight,
                prefix + "norm1.bias": block.ln_1.bias,
                prefix + "attn.qkv.weight": block.attn.in_proj_weight,
                prefix + "attn.qkv.bias": block.attn.in_proj_bias,
                prefix + "attn.proj.weight": block.attn.out_proj.weight,
                prefix + "attn.proj.bias": block.attn.out_proj.bias,
                prefix + "norm2.weight": block.ln_2.weight,
                prefix + "norm2.bias": block.ln_2.bias,
                prefix + "mlp.fc1.weight": block.mlp.c_fc.weight,
                prefix + "mlp.fc1.bias": block.mlp.c_fc.bias,
                prefix + "mlp.fc2.weight": block.mlp.c_proj.weight,
                prefix + "mlp.fc2.bias": block.mlp.c_proj.bias,
            }
        )
        if layer_scale:
            state[prefix + "ls1.gamma"], state[prefix + "ls2.gamma"] = block.ls_1.gamma, block.ls_2.gamma
    if visual.proj is not None:  # the projection after the final norm: open_clip's ``pooled @ proj``
        model.fc_norm = nn.Linear(*visual.proj.shape, bias=False)
        model.num_features = model.head_hidden_size = visual.proj.shape[1]
        state["fc_norm.weight"] = visual.proj.T
    missing, unexpected = model.load_state_dict(
        {k: v.detach().float() for k, v in state.items() if v is not None}, strict=False
    )
    if missing or unexpected:
        raise ModelLoadError(
            f"converting the open_clip image tower into timm left {missing[:3]} unset and {unexpected[:3]} unused"
        )
    return model.eval()


def _data_config(visual: nn.Module) -> dict[str, Any]:
    """timm's data config of open_clip's eval preprocessing (``visual.preprocess_cfg``)."""
    cfg = dict(getattr(visual, "preprocess_cfg", {}) or {})
    height, width = visual.image_size
    resize_mode = cfg.get("resize_mode", "shortest")
    if resize_mode not in ("shortest", "squash"):
        raise ModelLoadError(f"open_clip resize_mode {resize_mode!r} is not one cdam reproduces (shortest or squash)")
    return {
        "input_size": (3, height, width),
        "crop_pct": 1.0,
        "crop_mode": "center" if resize_mode == "shortest" else "squash",
        "interpolation": cfg.get("interpolation", "bicubic"),
        "mean": tuple(float(v) for v in cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))),
        "std": tuple(float(v) for v in cfg.get("std", (0.26862954, 0.26130258, 0.27577711))),
    }


@torch.no_grad()
def check_conversion(clip_model: nn.Module, model: VisionTransformer, input_size: tuple[int, int, int]) -> None:
    """ModelLoadError unless the timm copy's embedding equals ``encode_image`` on a probe batch (relative 1e-4)."""
    images = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
    expected = clip_model.encode_image(images).float()
    got = model.forward_head(model.forward_features(images), pre_logits=True)
    if got.shape != expected.shape or (got - expected).abs().max() > MATCH_TOLERANCE * expected.abs().max().clamp_min(
        1e-6
    ):
        raise ModelLoadError(
            "the converted timm image tower does not reproduce open_clip's encode_image; this model uses a feature cdam does not convert"
        )


def open_clip_text_side(architecture: str, tag: str | None, checkpoint: str | None) -> tuple[Any, float]:
    """(encode: prompts -> (P, E) text embeddings, logit scale) of the open_clip model, for text concepts."""
    return text_side_of(create_open_clip(architecture, tag, checkpoint), architecture)


def text_side_of(clip_model: nn.Module, architecture: str) -> tuple[Any, float]:
    """(encode, logit scale) of an open_clip model at hand, with its architecture's tokenizer."""
    import open_clip

    tokenizer = open_clip.get_tokenizer(Path(architecture).stem if architecture.endswith(".json") else architecture)

    @torch.no_grad()
    def encode(prompts: list[str]) -> torch.Tensor:
        return clip_model.encode_text(tokenizer(prompts)).float()

    return encode, float(clip_model.logit_scale.detach().exp())
