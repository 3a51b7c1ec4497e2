"""The attention-based estimators of ``cdam evaluate``, from one traced forward pass of a timm ViT:

- attention rollout (Abnar and Zuidema, 2020): per block the attention averaged over heads plus the identity,
  row-normalised, multiplied through the blocks (first block rightmost); class-independent;
- gradient-weighted attention (Chefer et al., ICCV 2021, "Generic Attention-model Explainability"):
  R = I, then per block R += mean_h(relu(dA * A)) @ R, with dA the gradient of the class's logit;
- relevance propagation for ViTs (Chefer et al., CVPR 2021, "Transformer Interpretability Beyond Attention
  Visualization"): LRP relevance of the class (alpha = 1, beta = 0 for linear layers, LRP-0 for the attention
  products, layer norms, GELU and softmax passed through, the residual sums split by their shares, as the
  authors' code), taken at each block's attention probabilities R_A and combined with their gradient:
  C = prod_b (I + mean_h(relu(dA_b * R_A_b))).

Each map is the row of the classification token over the patch tokens (a model without a class token
averages its patch tokens' rows, as its pooling averages those tokens): (B, K, N) for classes (B, K).
Supported: the standard timm ``Block`` with ``Attention`` (qkv) and ``Mlp`` (fc1, act, fc2), class-token or
average pooling; anything else raises ``UnsupportedModel``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer


class UnsupportedModel(ValueError):
    """The model is not a plain timm ViT the traced forward pass reproduces."""


@dataclass
class BlockTrace:
    """One block's activations: x_in -> (+ attention) x_mid -> (+ MLP) x_out."""

    x_in: torch.Tensor  # (B, L, D)
    normed1: torch.Tensor  # norm1(x_in)
    q: torch.Tensor  # (B, H, L, d), after q_norm
    k: torch.Tensor
    v: torch.Tensor
    attention: torch.Tensor  # (B, H, L, L) softmax probabilities
    heads: torch.Tensor  # (B, L, H * d): attention @ v, heads merged, after the attention's norm
    attended: torch.Tensor  # ls1(proj(heads)): what the attention adds to x_in
    x_mid: torch.Tensor
    normed2: torch.Tensor  # norm2(x_mid)
    hidden: torch.Tensor  # act(fc1(normed2))
    mlp_out: torch.Tensor  # ls2(fc2(hidden)): what the MLP adds to x_mid


def check_supported(model: VisionTransformer) -> None:
    """Raise ``UnsupportedModel`` naming what the traced forward pass does not reproduce."""
    if getattr(model, "attn_pool", None) is not None or model.global_pool not in ("token", "avg"):
        raise UnsupportedModel(
            f"global_pool {model.global_pool!r}: the attention estimators support 'token' and 'avg' pooling"
        )
    for index, block in enumerate(model.blocks):
        attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
        if (
            attn is None
            or not hasattr(attn, "qkv")
            or getattr(attn, "gate", None) is not None
            or mlp is None
            or not hasattr(mlp, "fc1")
            or not hasattr(mlp, "act")
        ):
            raise UnsupportedModel(
                f"block {index} ({type(block).__name__}) is not a timm Block with Attention(qkv) and Mlp(fc1, act, fc2)"
            )


def traced_forward(
    model: VisionTransformer, images: torch.Tensor
) -> tuple[torch.Tensor, list[BlockTrace], torch.Tensor]:
    """The model's forward pass computed step by step: (logits, one trace per block, the final tokens before
    the norm). Under ``torch.enable_grad()`` every activation is part of the graph (gradients of the attention)."""
    check_supported(model)
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    traces = []
    for block in model.blocks:
        attn = block.attn
        batch, length, _ = x.shape
        normed1 = block.norm1(x)
        q, k, v = attn.qkv(normed1).reshape(batch, length, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        attention = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        heads = attn.norm((attention @ v).transpose(1, 2).reshape(batch, length, -1))
        attended = block.ls1(attn.proj(heads))
        x_mid = x + attended
        normed2 = block.norm2(x_mid)
        hidden = block.mlp.norm(block.mlp.act(block.mlp.fc1(normed2)))
        mlp_out = block.ls2(block.mlp.fc2(hidden))
        traces.append(BlockTrace(x, normed1, q, k, v, attention, heads, attended, x_mid, normed2, hidden, mlp_out))
        x = x_mid + mlp_out
    return model.forward_head(model.norm(x)), traces, x


def output_rows(model: VisionTransformer, joint: torch.Tensor) -> torch.Tensor:
    """The map over the patch tokens from a (B, L, L) token-to-token matrix: the class token's row, or the mean
    of the patch tokens' rows for an average-pooled model."""
    prefix = model.num_prefix_tokens
    if model.global_pool == "token":
        return joint[:, 0, prefix:]
    return joint[:, prefix:, prefix:].mean(dim=1)


def _chain(per_block: list[torch.Tensor], normalise: bool) -> torch.Tensor:
    """prod_b (I + M_b) over the blocks, the first block rightmost; rows normalised to sum 1 if asked."""
    eye = torch.eye(per_block[0].shape[-1], device=per_block[0].device, dtype=per_block[0].dtype)
    joint = None
    for matrix in per_block:
        step = matrix + eye
        if normalise:
            step = step / step.sum(dim=-1, keepdim=True)
        joint = step if joint is None else step @ joint
    return joint


def _copies(images: torch.Tensor, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One image copy per (image, class): row b * K + k explains classes[b, k]."""
    return images.repeat_interleave(classes.shape[1], dim=0), classes.reshape(-1)


@torch.no_grad()
def attention_rollout(
    model: VisionTransformer, images: torch.Tensor, classes: torch.Tensor, max_rows: int
) -> torch.Tensor:
    """Attention rollout (B, K, N); the same map for every class."""
    maps = []
    for start in range(0, len(images), max_rows):
        _, traces, _ = traced_forward(model, images[start : start + max_rows])
        maps.append(output_rows(model, _chain([t.attention.mean(dim=1) for t in traces], normalise=True)))
    return torch.cat(maps)[:, None].expand(-1, classes.shape[1], -1).contiguous()


def gradient_weighted_attention(
    model: VisionTransformer, images: torch.Tensor, classes: torch.Tensor, max_rows: int
) -> torch.Tensor:
    """Chefer et al. (ICCV 2021): R = I; R += mean_h(relu(dA * A)) @ R per block: (B, K, N)."""
    return _gradient_weighted_chain(
        model, images, classes, max_rows, lambda traces, final, target: [t.attention for t in traces]
    )


def chefer_relevance(
    model: VisionTransformer, images: torch.Tensor, classes: torch.Tensor, max_rows: int
) -> torch.Tensor:
    """Chefer et al. (CVPR 2021), "transformer attribution": (B, K, N)."""
    return _gradient_weighted_chain(
        model,
        images,
        classes,
        max_rows,
        lambda traces, final, target: _attention_relevances(model, traces, final, target),
    )


def _gradient_weighted_chain(
    model: VisionTransformer,
    images: torch.Tensor,
    classes: torch.Tensor,
    max_rows: int,
    weighted_by: Callable[[list, torch.Tensor, torch.Tensor], list[torch.Tensor]],
) -> torch.Tensor:
    """Chefer et al.'s two chains: R = I; R += mean_h(relu(dA * X)) @ R per block, with dA the class score's gradient
    at each block's attention and X = ``weighted_by(traces, final, one-hot target)`` (the attention itself, or its
    LRP relevance): (B, K, N)."""
    copies, wanted = _copies(images, classes)
    maps = []
    for start in range(0, len(copies), max_rows):
        rows = slice(start, start + max_rows)
        with torch.enable_grad():
            logits, traces, final = traced_forward(model, copies[rows])
            grads = torch.autograd.grad(logits.gather(1, wanted[rows, None]).sum(), [t.attention for t in traces])
        with torch.no_grad():
            weights = weighted_by(traces, final, F.one_hot(wanted[rows], logits.shape[1]).to(logits.dtype))
            weighted = [(g * w).clamp(min=0).mean(dim=1) for g, w in zip(grads, weights)]
            maps.append(output_rows(model, _chain(weighted, normalise=False)))
    return torch.cat(maps).view(*classes.shape, -1)


# -- LRP, the rules of Chefer et al.'s code (batched: sums per image) -----------------------------------


def _safe_divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a / b, with b's zeros nudged to 1e-9 and their quotients set to 0 (the authors' ``safe_divide``)."""
    den = b.clamp(min=1e-9) + b.clamp(max=1e-9)
    den = den + den.eq(0).to(den.dtype) * 1e-9
    return a / den * b.ne(0).to(b.dtype)


def _linear_relevance(x: torch.Tensor, weight: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """LRP alpha = 1, beta = 0 through y = x W^T (the bias takes no relevance)."""
    positive, negative = weight.clamp(min=0), weight.clamp(max=0)
    x_pos, x_neg = x.clamp(min=0), x.clamp(max=0)
    share = _safe_divide(relevance, F.linear(x_pos, positive) + F.linear(x_neg, negative))
    return x_pos * (share @ positive) + x_neg * (share @ negative)


def _product_relevance(a: torch.Tensor, b: torch.Tensor, relevance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LRP-0 through z = a @ b, to both factors."""
    share = _safe_divide(relevance, a @ b)
    return a * (share @ b.transpose(-2, -1)), b * (a.transpose(-2, -1) @ share)


def _sum_relevance(a: torch.Tensor, b: torch.Tensor, relevance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LRP-0 through z = a + b, each part rescaled so that the two get the image's total relevance in the
    ratio of their absolute sums."""
    share = _safe_divide(relevance, a + b)
    to_a, to_b = a * share, b * share
    dims = tuple(range(1, relevance.ndim))
    sum_a, sum_b, total = to_a.sum(dims, keepdim=True), to_b.sum(dims, keepdim=True), relevance.sum(dims, keepdim=True)
    whole = sum_a.abs() + sum_b.abs()
    return to_a * _safe_divide(_safe_divide(sum_a.abs(), whole) * total, sum_a), to_b * _safe_divide(
        _safe_divide(sum_b.abs(), whole) * total, sum_b
    )


def _copy_relevance(x: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Relevance of x used twice (the residual branch and the block's input)."""
    return x * (_safe_divide(first, x) + _safe_divide(second, x))


def _attention_relevances(
    model: VisionTransformer, traces: list[BlockTrace], final: torch.Tensor, one_hot: torch.Tensor
) -> list[torch.Tensor]:
    """The relevance of ``one_hot`` (R, C) at every block's attention probabilities, first block first."""
    normed = model.norm(final)
    pooled = model.pool(normed)
    relevance = _linear_relevance(model.fc_norm(pooled), model.head.weight, one_hot)  # fc_norm, norm: passed through
    tokens = torch.zeros_like(normed)
    prefix = model.num_prefix_tokens
    if model.global_pool == "token":
        tokens[:, 0] = normed[:, 0] * _safe_divide(relevance, normed[:, 0])
    else:
        patches = normed[:, prefix:]
        tokens[:, prefix:] = patches * _safe_divide(relevance, pooled)[:, None] / patches.shape[1]
    relevance = tokens
    found = []
    for block, trace in zip(reversed(model.blocks), reversed(traces)):
        attn = block.attn
        to_mid, to_mlp = _sum_relevance(trace.x_mid, trace.mlp_out, relevance)
        to_normed2 = _linear_relevance(
            trace.normed2, block.mlp.fc1.weight, _linear_relevance(trace.hidden, block.mlp.fc2.weight, to_mlp)
        )
        relevance = _copy_relevance(trace.x_mid, to_mid, to_normed2)
        to_in, to_attended = _sum_relevance(trace.x_in, trace.attended, relevance)
        to_heads = _linear_relevance(trace.heads, attn.proj.weight, to_attended)
        batch, length, _ = to_heads.shape
        to_heads = to_heads.view(batch, length, attn.num_heads, -1).transpose(1, 2)
        to_attention, to_v = _product_relevance(trace.attention, trace.v, to_heads)
        to_attention, to_v = to_attention / 2, to_v / 2
        found.append(to_attention)
        to_q, to_kt = _product_relevance(trace.q, trace.k.transpose(-2, -1), to_attention)  # softmax: passed through
        to_qkv = (
            torch.stack([to_q / 2, to_kt.transpose(-2, -1) / 2, to_v]).permute(1, 3, 0, 2, 4).reshape(batch, length, -1)
        )
        relevance = _copy_relevance(trace.x_in, to_in, _linear_relevance(trace.normed1, attn.qkv.weight, to_qkv))
    return found[::-1]
