"""Hugging Face ``transformers`` ViTs for CDAM: ``--model hf:FOLDER`` (a ``save_pretrained`` folder) or ``hf:ORG/NAME``.

The checkpoint is loaded with ``transformers`` (safetensors only: no pickle) and its weights are copied
into the timm ``VisionTransformer`` that computes the same function, so the engine, its closed form and
its autograd path apply unchanged, and the model travels to the actors like any timm model (this module
imports ``transformers`` only when a checkpoint is loaded). The copy is checked on every load: the timm
model's outputs must equal the transformers model's on a probe image.

How each family maps onto timm (and which CDAM path it takes, ``CDAMExplainer.method``):

- ``ViTForImageClassification``: CLS token, final norm, linear head (closed form).
- ``DeiTForImageClassification``: the distillation token is a second prefix token (timm's ``reg_tokens=1``,
  with its position embedding) and the head reads the CLS token (closed form).
- ``DeiTForImageClassificationWithTeacher``: timm's ``VisionTransformerDistilled``, the mean of the CLS and
  distillation heads (autograd: its head reads two tokens).
- ``Dinov2Model`` / ``Dinov2WithRegistersModel``: layer scale, register tokens (no position embedding: the
  CLS token's is folded into it), the position embedding resampled by transformers' own interpolation to the
  image processor's size; features are the normed CLS token (closed form).
- ``Dinov2ForImageClassification`` (and with registers): the head reads concat(CLS, mean of patch tokens)
  (:class:`ClsMeanPooledViT`, autograd: patch tokens reach the head directly, not only through attention).
- ``CLIPVisionModel``: ``pre_layrnorm`` is timm's ``norm_pre``, ``post_layernorm`` the final norm, quick_gelu
  (closed form). ``CLIPVisionModelWithProjection`` and ``CLIPModel``'s image tower: the projection is applied
  after the final norm (in timm's ``fc_norm`` slot), so the embedding is CLIP's image embedding, the space
  of text concepts (closed form).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.layers import QuickGELU
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from cdam_worker.maps.model import LoadedModel, ModelLoadError

HF_PREFIX = "hf:"
MATCH_TOLERANCE = 1e-4  # the converted model's outputs vs transformers', relative to their largest magnitude
PIL_INTERPOLATION = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL resample codes of preprocessor_config.json
ACTIVATIONS = {
    "gelu": nn.GELU,
    "quick_gelu": QuickGELU,
    "gelu_new": functools.partial(nn.GELU, approximate="tanh"),
    "gelu_pytorch_tanh": functools.partial(nn.GELU, approximate="tanh"),
}
SUPPORTED = (
    "ViTForImageClassification",
    "DeiTForImageClassification",
    "DeiTForImageClassificationWithTeacher",
    "Dinov2Model",
    "Dinov2ForImageClassification",
    "Dinov2WithRegistersModel",
    "Dinov2WithRegistersForImageClassification",
    "CLIPVisionModel",
    "CLIPVisionModelWithProjection",
    "CLIPModel",
)


class ClsMeanPooledViT(VisionTransformer):
    """A timm ViT whose head reads concat(CLS token, mean of the patch tokens) after the final norm.

    ``Dinov2ForImageClassification``'s head; the embedding (``pre_logits``) is that 2D-wide concatenation.
    """

    closed_form_unsupported = "the head reads the mean of the patch tokens, which reach it outside the last attention"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.num_features = self.head_hidden_size = 2 * self.embed_dim
        self.head = nn.Linear(self.num_features, self.num_classes) if self.num_classes > 0 else nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = self.head_drop(torch.cat([x[:, 0], x[:, self.num_prefix_tokens :].mean(1)], dim=1))
        return pooled if pre_logits else self.head(pooled)


def load_hf_model(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint: Any = None,
    head_checkpoint: Any = None,
    class_names: list[str] | None = None,
    device: str | torch.device = "cpu",
    zero_shot: dict | None = None,
    **model_kwargs: Any,
) -> LoadedModel:
    """The transformers checkpoint ``hf:FOLDER`` or ``hf:ORG/NAME`` as a timm ViT with its image processor's transform."""
    if checkpoint is not None or head_checkpoint is not None or pretrained:
        raise ModelLoadError(
            f"--model {name}: the weights come from the folder (or the hub); drop --checkpoint, --head-checkpoint and --pretrained"
        )
    if model_kwargs:
        raise ModelLoadError(
            f"--model {name}: --model-kwargs do not apply to a transformers checkpoint (got {sorted(model_kwargs)})"
        )
    folder = _local_folder(name[len(HF_PREFIX) :])
    hf_model = _read_hf_model(folder)
    converted = convert_hf_model(hf_model)
    data_config = data_config_from_processor(folder / "preprocessor_config.json")
    converted.model = _with_input_size(hf_model, converted, data_config["input_size"][1:])
    check_conversion(hf_model, converted.model, data_config["input_size"])
    model = converted.model.eval().to(device)
    names = class_names or _class_names(hf_model.config, model.num_classes)
    if len(names) != model.num_classes:
        raise ModelLoadError(f"{len(names)} class names given for a model with {model.num_classes} classes")
    if type(hf_model).__name__ == "CLIPModel":
        from cdam_worker.maps.text_concepts import TextTower

        try:
            side = text_side_of(hf_model, str(folder))
        except ModelLoadError:  # no tokenizer saved: the image side works, text says why when asked for
            side = None
        model.text_tower = TextTower(functools.partial(hf_text_side, str(folder)), name, loaded=side)
    loaded = LoadedModel(
        model=model,
        transform=eval_transform(data_config),
        class_names=names,
        name=f"{HF_PREFIX}{folder}" if Path(name[len(HF_PREFIX) :]).is_dir() else name,
        model_kwargs={},
        checkpoint_sha256=weights_sha256(folder),
        data_config=data_config,
    )
    if zero_shot:
        from cdam_worker.maps.text_concepts import apply_zero_shot

        return apply_zero_shot(loaded, zero_shot)
    return loaded


def hf_text_side(folder: str) -> tuple[Any, float]:
    """(encode: prompts -> (P, E) text embeddings, logit scale) of the CLIPModel in ``folder``, with its tokenizer."""
    return text_side_of(_read_hf_model(Path(folder)), folder)


def text_side_of(model: nn.Module, folder: str) -> tuple[Any, float]:
    """(encode, logit scale) of a transformers CLIPModel at hand, with the tokenizer saved in ``folder``."""
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    except Exception as error:  # noqa: BLE001 - no or damaged tokenizer files
        raise ModelLoadError(
            f"{folder}: no tokenizer for the text tower (save it too: CLIPProcessor.save_pretrained(folder)): {str(error).splitlines()[0]}"
        ) from None

    @torch.no_grad()
    def encode(prompts: list[str]) -> torch.Tensor:
        tokens = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
        features = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return getattr(features, "pooler_output", features).float()

    return encode, float(model.logit_scale.detach().exp())


# -- reading the checkpoint ------------------------------------------------------------------------


def _local_folder(source: str) -> Path:
    """The folder of ``source``: a local ``save_pretrained`` folder, or the hub repository ``ORG/NAME`` downloaded."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise ModelLoadError(f"--model hf:{source}: not a folder (give the folder save_pretrained wrote)")
    if source.count("/") != 1 or source.startswith((".", "/", "~")):
        raise ModelLoadError(f"--model hf:{source}: no such folder, and not a hub repository name ORG/NAME")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as error:  # noqa: BLE001 - network, cache or unknown repository: one line
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(
            f"--model hf:{source}: cannot download it from the Hugging Face Hub: {type(error).__name__}: {reason}"
        ) from None


def _read_hf_model(folder: Path) -> nn.Module:
    """The transformers model saved in ``folder``, from its config.json and safetensors weights only."""
    try:
        import transformers
    except ImportError:
        raise ModelLoadError("--model hf:...: needs the transformers package (pip install 'cdam[hf]')") from None
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{folder}: no config.json (a transformers save_pretrained folder holds one)")
    if not any(folder.glob("*.safetensors")):
        pickled = sorted(p.name for p in folder.glob("*.bin"))
        hint = (
            f" ({', '.join(pickled)} is pickle, which cdam never loads: re-save with save_pretrained(safe_serialization=True))"
            if pickled
            else ""
        )
        raise ModelLoadError(f"{folder}: no .safetensors weights{hint}")
    try:
        architecture = (json.loads(config_path.read_text()).get("architectures") or [None])[0]
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"{config_path}: not valid JSON ({error})") from None
    if architecture not in SUPPORTED:
        raise ModelLoadError(
            f"{config_path}: architecture {architecture!r} is not supported; cdam explains {', '.join(SUPPORTED)}"
        )
    model_class = getattr(transformers, architecture, None)
    if model_class is None:
        raise ModelLoadError(
            f"{config_path}: this transformers ({transformers.__version__}) has no {architecture}; upgrade it"
        )
    transformers.utils.logging.disable_progress_bar()  # one bar per weight file is noise in cdam's output
    try:
        model = model_class.from_pretrained(folder, use_safetensors=True, attn_implementation="eager").float()
    except Exception as error:  # noqa: BLE001 - a damaged or inconsistent folder: one line
        raise ModelLoadError(
            f"{folder}: transformers cannot load it as {architecture}: {str(error).strip().splitlines()[0]}"
        ) from None
    return model.eval()


def weights_sha256(folder: Path) -> str:
    """One sha256 over the folder's safetensors files (name and content, sorted): the run's record of the weights."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _class_names(config: Any, num_classes: int) -> list[str]:
    labels = getattr(config, "id2label", None) or {}
    return [str(labels.get(i, labels.get(str(i), f"class_{i}"))) for i in range(num_classes)]


def data_config_from_processor(path: Path) -> dict[str, Any]:
    """timm's eval data config equal to the image processor's preprocessing (its PIL path): resize, crop, normalise.

    ``size: {height, width}`` squashes the image to that size; ``size: {shortest_edge}`` with a centre crop
    resizes the shorter side and crops the centre.
    """
    if not path.is_file():
        raise ModelLoadError(
            f"{path.parent}: no preprocessor_config.json (save the image processor too: processor.save_pretrained(folder))"
        )
    try:
        processor = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"{path}: not valid JSON ({error})") from None
    size, crop = processor.get("size"), processor.get("crop_size")
    interpolation = PIL_INTERPOLATION.get(processor.get("resample", 2))
    if interpolation is None:
        raise ModelLoadError(
            f"{path}: resample={processor.get('resample')} is not one cdam reproduces (nearest, bilinear or bicubic)"
        )
    if not processor.get("do_resize", True):
        raise ModelLoadError(f"{path}: do_resize is false; cdam needs a fixed input size")
    center_crop = bool(processor.get("do_center_crop")) and crop is not None
    if isinstance(size, int):
        size = {"shortest_edge": size}
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    if center_crop and "shortest_edge" in (size or {}):
        height, width = crop["height"], crop["width"]
        if height != width:
            raise ModelLoadError(
                f"{path}: a non-square crop after a shortest-edge resize is not supported ({height}x{width})"
            )
        edge = int(size["shortest_edge"])
        crop_pct = height / edge if math.floor(height / (height / edge)) == edge else height / (edge + 0.5)
        config = {"input_size": (3, height, width), "crop_pct": crop_pct, "crop_mode": "center"}
    elif size is not None and "height" in size and not center_crop:
        config = {"input_size": (3, int(size["height"]), int(size["width"])), "crop_pct": 1.0, "crop_mode": "squash"}
    else:
        raise ModelLoadError(
            f"{path}: resize {size} with crop {crop if center_crop else None} is not one cdam reproduces"
        )
    if processor.get("do_rescale", True) and abs(float(processor.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        raise ModelLoadError(f"{path}: rescale_factor {processor.get('rescale_factor')} is not 1/255")
    normalize = processor.get("do_normalize", True)
    config["mean"] = (
        tuple(float(v) for v in processor.get("image_mean", (0.5, 0.5, 0.5))) if normalize else (0.0, 0.0, 0.0)
    )
    config["std"] = (
        tuple(float(v) for v in processor.get("image_std", (0.5, 0.5, 0.5))) if normalize else (1.0, 1.0, 1.0)
    )
    config["interpolation"] = interpolation
    return config


class FlooredCenterCrop:
    """transformers' centre crop of a PIL image: the corner at floor((size - crop) / 2) (torchvision's rounds half up)."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = size

    def __call__(self, image: Any) -> Any:
        width, height = image.size
        top, left = (height - self.size[0]) // 2, (width - self.size[1]) // 2
        return image.crop((left, top, left + self.size[1], top + self.size[0]))


def eval_transform(data_config: dict[str, Any]) -> Any:
    """timm's eval transform of ``data_config`` with transformers' centre crop: the image processor's pixels."""
    from timm.data import create_transform
    from torchvision import transforms

    transform = create_transform(**data_config, is_training=False)
    transform.transforms = [
        FlooredCenterCrop(tuple(step.size)) if isinstance(step, transforms.CenterCrop) else step
        for step in transform.transforms
    ]
    return transform


def _image_size(hf_model: nn.Module) -> tuple[int, int]:
    config = _vision_config(hf_model.config)
    size = config.image_size
    return (size, size) if isinstance(size, int) else tuple(size)


def _vision_config(config: Any) -> Any:
    return getattr(config, "vision_config", None) or config


# -- conversion ------------------------------------------------------------------------------------


@dataclass
class Converted:
    """A converted timm model and its transformers family (vit, deit, dinov2, clip), which says how it takes other sizes."""

    model: VisionTransformer
    family: str


def _trunk_of(hf_model: nn.Module) -> tuple[str, nn.Module]:
    """(family, the module holding embeddings + encoder) of a supported transformers model."""
    for family, attribute in (
        ("clip", "vision_model"),
        ("vit", "vit"),
        ("deit", "deit"),
        ("dinov2", "dinov2"),
        ("dinov2", "dinov2_with_registers"),
    ):
        trunk = getattr(hf_model, attribute, None)
        if trunk is not None:
            return family, trunk
    name = type(hf_model).__name__
    family = (
        "clip"
        if name.startswith("CLIP")
        else "deit"
        if name.startswith("DeiT")
        else "dinov2"
        if name.startswith("Dinov2")
        else "vit"
    )
    return family, hf_model


def _find(module: nn.Module, *paths: str) -> nn.Module:
    """The first of ``paths`` that ``module`` has (names differ between transformers versions)."""
    for path in paths:
        try:
            return module.get_submodule(path)
        except AttributeError:
            continue
    raise ModelLoadError(
        f"{type(module).__name__} has none of {', '.join(paths)}: a transformers layout cdam does not know"
    )


def _layers(family: str, trunk: nn.Module) -> list[nn.Module]:
    if family == "clip":
        return list(trunk.encoder.layers)
    return list(_find(trunk, "encoder.layer", "encoder.layers", "layers", "layer"))


def _layer_parts(family: str, layer: nn.Module) -> dict[str, nn.Module | None]:
    """The norm, attention projections, layer scales and MLP of one transformers encoder layer."""
    if family == "clip":
        attn, norms, mlp = layer.self_attn, ("layer_norm1", "layer_norm2"), ("mlp.fc1", "mlp.fc2")
    elif family == "dinov2":
        attn, norms, mlp = layer.attention, ("norm1", "norm2"), ("mlp.fc1", "mlp.fc2")
    else:
        attn, norms, mlp = (
            layer.attention,
            ("layernorm_before", "layernorm_after"),
            ("mlp.fc1|intermediate.dense", "mlp.fc2|output.dense"),
        )
    if family == "dinov2" and (hasattr(layer.mlp, "gate_proj") or hasattr(layer.mlp, "weights_in")):
        raise ModelLoadError("a DINOv2 with a SwiGLU MLP (use_swiglu_ffn, the giant model) is not supported")
    return {
        "norm1": _find(layer, norms[0]),
        "q": _find(attn, "q_proj", "attention.query"),
        "k": _find(attn, "k_proj", "attention.key"),
        "v": _find(attn, "v_proj", "attention.value"),
        "o": _find(attn, "o_proj", "out_proj", "output.dense"),
        "ls1": getattr(layer, "layer_scale1", None),
        "norm2": _find(layer, norms[1]),
        "fc1": _find(layer, *mlp[0].split("|")),
        "fc2": _find(layer, *mlp[1].split("|")),
        "ls2": getattr(layer, "layer_scale2", None),
    }


def convert_hf_model(hf_model: nn.Module) -> Converted:
    """The timm ViT with ``hf_model``'s weights, at the model's own input size (see :func:`_with_input_size`)."""
    family, trunk = _trunk_of(hf_model)
    config = _vision_config(hf_model.config)
    architecture = type(hf_model).__name__
    activation = ACTIVATIONS.get(config.hidden_act)
    if activation is None:
        raise ModelLoadError(
            f"activation {config.hidden_act!r} is not supported (expected one of {', '.join(ACTIVATIONS)})"
        )
    layers = _layers(family, trunk)
    first = _layer_parts(family, layers[0])
    hidden, intermediate = config.hidden_size, first["fc1"].out_features
    registers = int(getattr(config, "num_register_tokens", 0) or 0)
    head = _head_of(hf_model, architecture)
    distilled = architecture == "DeiTForImageClassificationWithTeacher"
    classes = head.out_features if isinstance(head, nn.Linear) and not architecture.startswith("CLIP") else 0
    kwargs = {
        "img_size": _image_size(hf_model),
        "patch_size": config.patch_size,
        "in_chans": config.num_channels,
        "num_classes": classes,
        "global_pool": "token",
        "embed_dim": hidden,
        "depth": len(layers),
        "num_heads": config.num_attention_heads,
        "mlp_ratio": (intermediate + 0.5) / hidden,  # timm takes int(hidden * ratio): exactly ``intermediate``
        "qkv_bias": first["q"].bias is not None,
        "init_values": 1.0 if first["ls1"] is not None else None,
        "class_token": True,
        "reg_tokens": registers if family == "dinov2" else (1 if family == "deit" and not distilled else 0),
        "no_embed_class": registers > 0,  # DINOv2's registers have no position embedding: the CLS token's is folded in
        "pre_norm": family == "clip",
        "norm_layer": functools.partial(nn.LayerNorm, eps=config.layer_norm_eps),
        "act_layer": activation,
        "weight_init": "skip",
    }
    model_class = (
        VisionTransformerDistilled
        if distilled
        else ClsMeanPooledViT
        if architecture.endswith("ForImageClassification") and family == "dinov2"
        else VisionTransformer
    )
    model = model_class(**kwargs)
    state = _trunk_state(family, trunk, layers, registers, distilled)
    state.update(_head_state(hf_model, architecture, head))
    if architecture in ("CLIPVisionModelWithProjection", "CLIPModel"):
        projection = hf_model.visual_projection
        model.fc_norm = nn.Linear(projection.in_features, projection.out_features, bias=False)  # after the final norm
        model.num_features = model.head_hidden_size = projection.out_features
        state["fc_norm.weight"] = projection.weight
    missing, unexpected = model.load_state_dict({k: v.detach().float() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise ModelLoadError(
            f"{architecture}: converting into timm left {len(missing)} weights unset (e.g. {missing[:3]}) and {len(unexpected)} unused (e.g. {unexpected[:3]})"
        )
    return Converted(model.eval(), family)


def _head_of(hf_model: nn.Module, architecture: str) -> nn.Module | None:
    if architecture == "DeiTForImageClassificationWithTeacher":
        return hf_model.cls_classifier
    return getattr(hf_model, "classifier", None)


def _trunk_state(
    family: str, trunk: nn.Module, layers: list[nn.Module], registers: int, distilled: bool
) -> dict[str, torch.Tensor]:
    """timm's state dict of the embeddings, blocks and final norm (DeiT's distillation token: timm's ``dist_token``
    in the distilled model, else its one register token)."""
    embeddings = trunk.embeddings
    state: dict[str, torch.Tensor] = {}
    if family == "clip":
        patch = embeddings.patch_embedding
        cls = embeddings.class_embedding.view(1, 1, -1)
        position = embeddings.position_embedding.weight[None]
        state.update({"norm_pre.weight": trunk.pre_layrnorm.weight, "norm_pre.bias": trunk.pre_layrnorm.bias})
        final_norm = trunk.post_layernorm
    else:
        patch = embeddings.patch_embeddings.projection
        cls = embeddings.cls_token
        position = embeddings.position_embeddings
        final_norm = _find(trunk, "layernorm")
    state["patch_embed.proj.weight"] = patch.weight
    if patch.bias is not None:
        state["patch_embed.proj.bias"] = patch.bias
    if registers:
        state["cls_token"] = cls + position[:, :1]
        state["reg_token"] = embeddings.register_tokens
        state["pos_embed"] = position[:, 1:]
    else:
        state["cls_token"] = cls
        state["pos_embed"] = position
    if getattr(embeddings, "distillation_token", None) is not None:
        state["dist_token" if distilled else "reg_token"] = embeddings.distillation_token
    for index, layer in enumerate(layers):
        parts = _layer_parts(family, layer)
        prefix = f"blocks.{index}."
        q, k, v = parts["q"], parts["k"], parts["v"]
        state[prefix + "attn.qkv.weight"] = torch.cat([q.weight, k.weight, v.weight])
        if q.bias is not None:
            state[prefix + "attn.qkv.bias"] = torch.cat([q.bias, k.bias, v.bias])
        for timm_name, hf_name in (
            ("norm1", "norm1"),
            ("attn.proj", "o"),
            ("norm2", "norm2"),
            ("mlp.fc1", "fc1"),
            ("mlp.fc2", "fc2"),
        ):
            state[prefix + timm_name + ".weight"] = parts[hf_name].weight
            state[prefix + timm_name + ".bias"] = parts[hf_name].bias
        for timm_name, hf_name in (("ls1", "ls1"), ("ls2", "ls2")):
            if parts[hf_name] is not None:
                state[prefix + timm_name + ".gamma"] = parts[hf_name].lambda1
    state["norm.weight"], state["norm.bias"] = final_norm.weight, final_norm.bias
    return state


def _head_state(hf_model: nn.Module, architecture: str, head: nn.Module | None) -> dict[str, torch.Tensor]:
    if not isinstance(head, nn.Linear) or architecture.startswith("CLIP"):
        return {}
    state = {"head.weight": head.weight, "head.bias": head.bias}
    if architecture == "DeiTForImageClassificationWithTeacher":
        state.update(
            {
                "head_dist.weight": hf_model.distillation_classifier.weight,
                "head_dist.bias": hf_model.distillation_classifier.bias,
            }
        )
    return state


def _with_input_size(hf_model: nn.Module, converted: Converted, size: tuple[int, int]) -> VisionTransformer:
    """The converted model for inputs of ``size`` (the image processor's): DINOv2 resamples its position
    embedding as transformers does for that size; the others, like transformers, take their own size only."""
    model = converted.model
    size = tuple(int(s) for s in size)
    if size == tuple(model.patch_embed.img_size):
        return model
    if converted.family != "dinov2":
        raise ModelLoadError(
            f"the image processor makes {size[0]}x{size[1]} images but the model takes {model.patch_embed.img_size[0]}x{model.patch_embed.img_size[1]}"
        )
    embeddings = _trunk_of(hf_model)[1].embeddings
    patch = model.patch_embed.patch_size
    grid = (size[0] // patch[0], size[1] // patch[1])
    with torch.no_grad():
        probe = torch.zeros(1, 1 + grid[0] * grid[1], model.embed_dim)
        position = embeddings.interpolate_pos_encoding(probe, size[0], size[1]).float()
    model.patch_embed.img_size, model.patch_embed.grid_size = size, grid
    model.patch_embed.num_patches = grid[0] * grid[1]
    if model.no_embed_class:
        model.cls_token.data = (model.cls_token.data - embeddings.position_embeddings[:, :1].float()) + position[:, :1]
        position = position[:, 1:]
    model.pos_embed = nn.Parameter(position.clone())
    return model


def hf_outputs(hf_model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What the transformers model gives for ``images``: logits, or the (projected) image features of a headless one."""
    name = type(hf_model).__name__
    if name == "CLIPModel":
        features = hf_model.get_image_features(pixel_values=images)
        return getattr(features, "pooler_output", features)
    outputs = hf_model(pixel_values=images)
    for field in ("logits", "image_embeds", "pooler_output"):
        value = getattr(outputs, field, None)
        if value is not None:
            return value
    raise ModelLoadError(f"{name} gives none of logits, image_embeds, pooler_output")


def timm_outputs(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """The converted model's counterpart of :func:`hf_outputs`: logits with a head, else the embedding."""
    features = model.forward_features(images)
    return model.forward_head(features, pre_logits=model.num_classes == 0)


@torch.no_grad()
def check_conversion(hf_model: nn.Module, model: VisionTransformer, input_size: tuple[int, int, int]) -> None:
    """ModelLoadError unless the converted model's outputs equal transformers' on a probe batch (relative 1e-4)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, *input_size, generator=generator)
    expected = hf_outputs(hf_model, images).float()
    got = timm_outputs(model.eval(), images)
    if got.shape != expected.shape or (got - expected).abs().max() > MATCH_TOLERANCE * expected.abs().max().clamp_min(
        1e-6
    ):
        difference = (
            (got - expected).abs().max().item()
            if got.shape == expected.shape
            else f"shape {tuple(got.shape)} vs {tuple(expected.shape)}"
        )
        raise ModelLoadError(
            f"{type(hf_model).__name__}: the converted timm model does not reproduce transformers' outputs (max difference {difference}); this checkpoint uses a feature cdam does not convert"
        )
