"""The CDAM engine: batched maps for every target of interest, vanilla, Smooth or Integrated.

``CDAMExplainer(model).explain(images, targets=...)`` runs the trunk once (all blocks but the last),
then computes the maps from the last block's input by the closed form (CLS-pooled ViTs, spec
section 3) or by autograd through the last block (every other timm ViT). Smooth and Integrated
CDAM (spec section 2) alter the last block's input and re-run only the last block, on chunks of
(image, copy) rows sized to the device (``memory_budget.py``): ``max_rows`` rows (256 on the CPU), or on
CUDA as many as half the free GPU memory holds. The variants wrap the vanilla pass (``variants.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Literal, Sequence

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from cdam_worker.maps.autograd_path import autograd_maps, head_outputs
from cdam_worker.maps.closed_form import closed_form_maps, closed_form_unsupported_reason, maps_from_basis
from cdam_worker.maps.memory_budget import MemoryBudget
from cdam_worker.maps.model import LoadedModel
from cdam_worker.maps.targets import Concept, TargetSpec, concept_directions, concept_scores
from cdam_worker.maps.variants import Variant, VariantConfig, VariantMaps

Method = Literal["auto", "closed_form", "autograd"]
Precision = Literal["float32", "bf16", "tf32"]


@dataclass
class CDAMResult:
    """Maps and model outputs for a batch; maps are at token resolution (the patch grid)."""

    cdam: torch.Tensor  # (B, K, gh, gw) signed CDAM per target slot
    target_class: torch.Tensor  # (B, K) class index of each slot, -1 for concepts
    attention: torch.Tensor  # (B, heads, gh, gw) last block's CLS-query attention
    logits: torch.Tensor  # (B, C)
    embedding: torch.Tensor  # (B, D) pre-logits feature
    method: str  # "closed_form" or "autograd"
    basis: torch.Tensor | None = None  # (B, D, gh, gw) relevance basis, when asked for
    concept_names: tuple[str, ...] = field(default_factory=tuple)


def content_key(image: torch.Tensor) -> str:
    """A key derived from the pixels, used when the caller gives none."""
    return hashlib.sha1(image.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


class CDAMExplainer:
    """Batched CDAM for a timm VisionTransformer.

    ``method="auto"`` uses the closed form where it is exact (CLS pooling, plain softmax attention,
    no qk-norm, linear head) and autograd through the last block otherwise; ``self.method`` and
    ``self.method_reason`` say which and why. Asking for ``"closed_form"`` where it does not hold
    raises ``ValueError``.

    ``precision`` is the trunk's (all blocks but the last); vanilla maps are exact float32 whatever it
    is. ``variant_precision`` is that of the last-block re-runs of Smooth/Integrated CDAM; by default
    they follow ``precision``. ``max_rows`` caps the rows (copies of an image's last-block input) of
    one pass, in autograd backward passes and Smooth/Integrated chunks; by default 256 on the CPU
    and, on CUDA, as many as half the free GPU memory holds. Maps do not depend on it.
    """

    def __init__(
        self,
        model: nn.Module | LoadedModel,
        method: Method = "auto",
        precision: Precision = "float32",
        class_names: Sequence[str] | None = None,
        max_rows: int | None = None,
        variant_precision: Precision | None = None,
    ) -> None:
        if isinstance(model, LoadedModel):
            class_names = class_names or model.class_names
            model = model.model
        if not isinstance(model, VisionTransformer):
            raise ValueError(
                f"{type(model).__name__} is not a timm VisionTransformer: CDAM supports the VisionTransformer family (ViT, DeiT, DINO, CLIP, hybrids)"
            )
        if type(model).forward_features is not VisionTransformer.forward_features:
            raise ValueError(
                f"{type(model).__name__} overrides forward_features; only timm's VisionTransformer trunk is supported"
            )
        last_block = model.blocks[-1]
        if not (hasattr(last_block, "norm1") and hasattr(getattr(last_block, "attn", None), "qkv")):
            raise ValueError(
                f"the last block is a {type(last_block).__name__} without norm1 and a qkv attention: CDAM is defined at blocks[-1].norm1"
            )
        for name, value in (("precision", precision), ("variant_precision", variant_precision or precision)):
            if value not in ("float32", "bf16", "tf32"):
                raise ValueError(f"{name} must be float32, bf16 or tf32, not {value!r}")
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        reason = closed_form_unsupported_reason(model)
        if method == "closed_form" and reason is not None:
            raise ValueError(f"the closed form does not hold for this model: {reason}; use method='autograd' or 'auto'")
        if method not in ("auto", "closed_form", "autograd"):
            raise ValueError(f"method must be auto, closed_form or autograd, not {method!r}")
        self.model = model.eval()
        self.method = "closed_form" if method == "closed_form" or (method == "auto" and reason is None) else "autograd"
        self.method_reason = (
            "closed form: CLS-pooled ViT with plain softmax attention"
            if self.method == "closed_form"
            else f"autograd through the last block: {reason or 'asked for'}"
        )
        self.precision = precision
        self.variant_precision = variant_precision or precision
        self.class_names = (
            list(class_names) if class_names is not None else [f"class_{i}" for i in range(self.num_classes)]
        )
        self.budget = MemoryBudget(self.model, self.method, max_rows)
        self.variants = VariantMaps(
            self._maps, self.variant_chunks, self._variant_precision_scope, model.num_prefix_tokens
        )

    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)

    @property
    def input_channels(self) -> int | None:
        """Channels the model takes: those of the first convolution of its patch embedding (a hybrid's stem)."""
        first_conv = next((m for m in self.model.patch_embed.modules() if isinstance(m, nn.Conv2d)), None)
        return first_conv.in_channels if first_conv is not None else None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """The (gh, gw) token grid for an image of this size; ValueError when the model cannot take it."""
        patch_embed = self.model.patch_embed
        if getattr(self.model, "dynamic_img_size", False):
            ph, pw = patch_embed.feat_ratio(as_scalar=False)  # pixels per token (a hybrid's backbone stride included)
            if not getattr(patch_embed, "dynamic_img_pad", False) and (height % ph or width % pw):
                raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {ph}x{pw}")
            return tuple(patch_embed.dynamic_feat_size((height, width)))
        expected = tuple(patch_embed.img_size)
        if (height, width) != expected:
            raise ValueError(
                f"image size {height}x{width} does not match the model's input size {expected[0]}x{expected[1]} "
                f"(patch grid {patch_embed.grid_size[0]}x{patch_embed.grid_size[1]}); resize the images or create the model with dynamic_img_size=True"
            )
        return tuple(patch_embed.grid_size)

    @torch.no_grad()
    def last_block_input(self, images: torch.Tensor) -> torch.Tensor:
        """X, the input of the last block (B, P+N, D), in float32 (the trunk may run in bf16/TF32)."""
        model = self.model
        with self._precision_scope(self.precision):
            x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
            x = model.blocks[:-1](x)
        return x.float()

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The pre-logits embedding h (B, D), e.g. to build concept vectors."""
        self._check_images(images)
        with cuda_fp32_precision(self.device, "ieee"):
            return head_outputs(self.model, self.last_block_input(images.to(self.device))).embedding

    def concept_from_images(
        self, name: str, images: torch.Tensor | Iterable[torch.Tensor], similarity: str = "dot"
    ) -> Concept:
        """A concept vector: the mean embedding of example images of the concept.

        ``images``: one batch (B, 3, H, W), or an iterable of batches when the examples are many.
        """
        batches = [images] if isinstance(images, torch.Tensor) else images
        embeddings = [self.embed(batch) for batch in batches]
        if not embeddings or sum(len(e) for e in embeddings) == 0:
            raise ValueError(f"concept {name!r}: no example images")
        return Concept(name, torch.cat(embeddings).mean(0).cpu(), similarity)

    def explain(
        self,
        images: torch.Tensor,
        targets: str | TargetSpec | torch.Tensor | Sequence[int] = "topk:1",
        *,
        concepts: Sequence[Concept] = (),
        labels: torch.Tensor | Sequence[int] | None = None,
        keys: Sequence[str] | None = None,
        variant: Variant | VariantConfig = "vanilla",
        return_basis: bool = False,
    ) -> CDAMResult:
        """CDAM of a batch (B, 3, H, W) for every target slot.

        ``targets``: a spec string (``topk:5``, ``label``, ``classes:3,zebra``, ``all``, ``none``), a
        list of class indices (same for every image) or a (B, K) tensor (per image). ``concepts`` add
        slots after the classes. ``keys`` seed the noise of Smooth/Integrated per image (default: a
        hash of the pixels), so an image gets the same map in any batch.
        """
        grid = self._check_images(images)
        images = images.to(self.device)
        batch = images.shape[0]
        config = variant if isinstance(variant, VariantConfig) else VariantConfig(name=variant)
        concepts = tuple(concepts)
        embed_dim = self.model.num_features
        for concept in concepts:
            if concept.vector.numel() != embed_dim:
                raise ValueError(
                    f"concept {concept.name!r} has {concept.vector.numel()} dims but the model's embedding has {embed_dim}"
                )
        if return_basis and not _linear_logits(self.model):
            raise ValueError(
                f"a relevance basis needs logits linear in the embedding; {type(self.model).__name__} has its own head"
            )
        resolve = self._target_resolver(targets, labels, batch)

        if config.name != "vanilla":
            keys = list(keys) if keys is not None else [content_key(image) for image in images]
            if len(keys) != batch:
                raise ValueError(f"got {len(keys)} keys for {batch} images")
        with cuda_fp32_precision(self.device, "ieee"):  # exact float32 maps, whatever the trunk ran in
            block_input = self.last_block_input(images)
            if config.name == "vanilla":
                result = self._maps(block_input, resolve, concepts, return_basis)
            else:
                result = self.variants(block_input, resolve, concepts, return_basis, keys, config)

        prefix = self.model.num_prefix_tokens
        concept_slots = torch.full((batch, len(concepts)), -1, dtype=torch.long, device=images.device)
        return CDAMResult(
            cdam=result.cdam.reshape(batch, -1, *grid),
            target_class=torch.cat([result.target_class, concept_slots], dim=1),
            attention=result.attention[:, :, prefix:].reshape(batch, -1, *grid),
            logits=result.logits,
            embedding=result.embedding,
            method=self.method,
            basis=result.basis.reshape(batch, -1, *grid) if result.basis is not None else None,
            concept_names=tuple(c.name for c in concepts),
        )

    def rows_per_pass(self, tokens: int) -> int:
        """Rows (copies of a last-block input of ``tokens`` tokens) one pass may hold: ``max_rows``, or sized to the device."""
        return self.budget.rows_per_pass(tokens)

    def variant_chunks(self, batch: int, tokens: int, config: VariantConfig, columns: bool = False) -> tuple[int, int]:
        """(images per group, copies per chunk) of Smooth/Integrated CDAM (see :meth:`MemoryBudget.variant_chunks`).
        ``columns``: the closed form takes its column route (more targets than patches, or the basis)."""
        return self.budget.variant_chunks(batch, tokens, config.n_maps, config.sigma_fraction > 0, columns)

    # -- helpers -------------------------------------------------------------------------------

    def _check_images(self, images: torch.Tensor) -> tuple[int, int]:
        channels = self.input_channels
        if (
            not isinstance(images, torch.Tensor)
            or images.ndim != 4
            or (channels is not None and images.shape[1] != channels)
        ):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a (B, {channels or 'C'}, H, W) tensor, got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"images must be a float tensor (normalised by the model's transform), got {images.dtype}")
        return self.patch_grid(images.shape[2], images.shape[3])

    def _precision_scope(self, precision: Precision) -> contextlib.AbstractContextManager:
        """bf16 autocast, TF32 allowed on CUDA, or exact float32."""
        if precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return cuda_fp32_precision(self.device, "tf32" if precision == "tf32" else "ieee")

    def _variant_precision_scope(self) -> contextlib.AbstractContextManager:
        """Where Smooth/Integrated CDAM runs the last block on its altered copies."""
        return self._precision_scope(self.variant_precision)

    def _target_resolver(self, targets, labels, batch: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """A function logits (B, C) -> target classes (B, Kc), validated up front."""
        if isinstance(targets, str):
            targets = TargetSpec.parse(targets, self.class_names)
        if isinstance(targets, TargetSpec):
            if targets.kind in ("classes", "topk", "all", "label") and self.num_classes == 0:
                raise ValueError("the model has no classifier head: use concept targets with targets='none'")
            if targets.kind == "classes":
                for index in targets.classes:
                    _check_class_index(index, self.num_classes)
            if targets.kind == "label":
                if labels is None:
                    raise ValueError("targets 'label' need labels=... (one ground-truth class per image)")
                labels = torch.as_tensor(labels).long().reshape(-1)
                if labels.numel() != batch:
                    raise ValueError(f"got {labels.numel()} labels for {batch} images")
                for index in labels.tolist():
                    _check_class_index(index, self.num_classes)
            spec = targets
            return lambda logits: spec.resolve(logits, labels)
        fixed = torch.as_tensor(targets).long()
        if fixed.ndim == 1:
            fixed = fixed.expand(batch, -1)
        if fixed.ndim != 2 or fixed.shape[0] != batch:
            raise ValueError(
                f"explicit targets must be a list of classes or a (B, K) tensor with B={batch}, got shape {tuple(fixed.shape)}"
            )
        for index in fixed.unique().tolist():
            _check_class_index(index, self.num_classes)
        return lambda logits: fixed.to(logits.device)

    def _maps(
        self,
        block_input: torch.Tensor,
        resolve,
        concepts: tuple[Concept, ...],
        want_basis: bool,
        with_maps: bool = True,
    ) -> "_MapsPass":
        if self.method == "closed_form":
            return self._closed_form_pass(block_input, resolve, concepts, want_basis, with_maps)
        return self._autograd_pass(block_input, resolve, concepts, want_basis, with_maps)

    def _closed_form_pass(self, block_input, resolve, concepts, want_basis, with_maps) -> "_MapsPass":
        model = self.model
        resolved: dict[str, torch.Tensor] = {}

        def directions_of(embedding: torch.Tensor) -> torch.Tensor:
            logits = model.head(embedding) if self.num_classes else embedding.new_zeros(embedding.shape[0], 0)
            target_class = resolve(logits)
            resolved.update(logits=logits.detach(), target_class=target_class)
            if not with_maps:
                return embedding.new_zeros(embedding.shape[0], 0, embedding.shape[1])
            return self._directions(target_class, concepts, embedding)

        with torch.no_grad():
            out = closed_form_maps(model, block_input, directions_of, want_basis)
        return _MapsPass(
            out.maps, out.basis, resolved["target_class"], resolved["logits"], out.embedding, out.attention
        )

    def _autograd_pass(self, block_input, resolve, concepts, want_basis, with_maps) -> "_MapsPass":
        model = self.model
        batch = block_input.shape[0]
        with torch.no_grad():
            outputs = head_outputs(model, block_input)
            attention = cls_attention(model, block_input)
        target_class = resolve(outputs.logits)
        if not with_maps:
            return _MapsPass(None, None, target_class, outputs.logits, outputs.embedding, attention)

        num_targets = target_class.shape[1] + len(concepts)
        rows = self.rows_per_pass(block_input.shape[1])
        if _linear_logits(model) and (want_basis or num_targets > model.num_features):
            # logits linear in the embedding: every map is g . basis, so D backward rows serve all K targets
            basis = autograd_maps(model, block_input, lambda _logits, embedding: embedding, model.num_features, rows)
            maps = maps_from_basis(self._directions(target_class, concepts, outputs.embedding), basis.transpose(1, 2))
            return _MapsPass(
                maps, basis if want_basis else None, target_class, outputs.logits, outputs.embedding, attention
            )

        def score_of(logits: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
            classes = target_class.repeat(logits.shape[0] // batch, 1)
            return torch.cat([logits.gather(1, classes), concept_scores(concepts, embedding)], dim=1)

        maps = autograd_maps(model, block_input, score_of, num_targets, rows)
        return _MapsPass(maps, None, target_class, outputs.logits, outputs.embedding, attention)

    def _directions(
        self, target_class: torch.Tensor, concepts: tuple[Concept, ...], embedding: torch.Tensor
    ) -> torch.Tensor:
        """The gradient of every slot's score with respect to the embedding (B, K, D): head rows, then concepts."""
        if self.num_classes:
            head_rows = class_directions(self.model.head.weight, target_class)
        else:
            head_rows = embedding.new_zeros(embedding.shape[0], 0, embedding.shape[1])
        if not concepts:
            return head_rows
        return torch.cat([head_rows, concept_directions(concepts, embedding)], dim=1)


@dataclass
class _MapsPass:
    cdam: torch.Tensor | None  # (B, K, N)
    basis: torch.Tensor | None  # (B, D, N)
    target_class: torch.Tensor  # (B, Kc)
    logits: torch.Tensor
    embedding: torch.Tensor
    attention: torch.Tensor  # (B, H, L)


def cls_attention(model: nn.Module, block_input: torch.Tensor) -> torch.Tensor:
    """The last block's attention weights (B, H, L) with the CLS token as query (mean over queries without one)."""
    attn = model.blocks[-1].attn
    if not hasattr(attn, "qkv"):
        raise ValueError(f"cannot read attention weights from a {type(attn).__name__} (no fused qkv projection)")
    tokens = model.blocks[-1].norm1(block_input)
    batch, length, _ = tokens.shape
    qkv = attn.qkv(tokens).reshape(batch, length, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    query, key = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    if getattr(model, "cls_token", None) is not None:
        query = query[:, :, :1]
    weights = ((query * attn.scale) @ key.transpose(-2, -1)).softmax(-1)
    return weights.mean(2)


def _linear_logits(model: nn.Module) -> bool:
    """Whether the logits are the head's linear map of the embedding (not e.g. text_concepts.ZeroShotHead's cosine)."""
    return type(model) is VisionTransformer and isinstance(model.head, (nn.Linear, nn.Identity))


def class_directions(head_weight: torch.Tensor, target_class: torch.Tensor) -> torch.Tensor:
    """The head rows of each slot's class (B, K, D); an expanded view when every image has the same classes."""
    if target_class.shape[0] > 1 and (target_class == target_class[:1]).all():
        return head_weight[target_class[0]].expand(target_class.shape[0], -1, -1)
    return head_weight[target_class]


def _check_class_index(index: int, num_classes: int) -> None:
    if not 0 <= index < num_classes:
        raise ValueError(
            f"class index {index} is out of range: the model has {num_classes} classes (0..{num_classes - 1})"
        )


@contextlib.contextmanager
def cuda_fp32_precision(device: torch.device, mode: Literal["ieee", "tf32"]) -> Iterator[None]:
    """Float32 matmuls and convolutions on CUDA in exact float32 ("ieee") or TensorFloat-32; nothing elsewhere."""
    if device.type != "cuda":
        yield
        return
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    previous = matmul.fp32_precision, conv.fp32_precision
    matmul.fp32_precision = conv.fp32_precision = mode
    try:
        yield
    finally:
        matmul.fp32_precision, conv.fp32_precision = previous
