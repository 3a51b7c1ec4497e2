"""The literal CDAM definition (spec section 4): hook ``blocks[-1].norm1``, autograd, per-token dot product.

Slow on purpose (one backward per image and target); every fast path is tested against it.
"""

from __future__ import annotations

from typing import Callable

import torch


def reference_cdam(
    model: torch.nn.Module, image: torch.Tensor, score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """CDAM of one image (C, H, W) for ``score(logits, pre_logits) -> scalar``; returns (N,) patch scores."""
    captured: dict[str, torch.Tensor] = {}

    def keep_output(_module, _inputs, output):
        output.retain_grad()
        captured["T"] = output

    handle = model.blocks[-1].norm1.register_forward_hook(keep_output)
    try:
        with torch.enable_grad():
            features = model.forward_features(image[None])
            pre_logits = model.forward_head(features, pre_logits=True)
            logits = model.forward_head(features)
            value = score(logits[0], pre_logits[0])
            value.backward()
    finally:
        handle.remove()
    tokens = captured["T"]
    relevance = (tokens * tokens.grad).sum(-1)[0]
    return relevance[model.num_prefix_tokens :].detach()


def reference_attention(model: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    """The last block's CLS-query attention per head (heads, N), prefix columns dropped.

    For a model without a CLS token: the attention each token receives, averaged over all queries.
    """
    captured: dict[str, torch.Tensor] = {}
    handle = model.blocks[-1].norm1.register_forward_hook(lambda _m, _i, out: captured.setdefault("T", out))
    try:
        with torch.no_grad():
            model.forward_features(image[None])
    finally:
        handle.remove()
    attn = model.blocks[-1].attn
    tokens = captured["T"][0]
    qkv = attn.qkv(tokens).reshape(tokens.shape[0], 3, attn.num_heads, attn.head_dim).permute(1, 2, 0, 3)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    queries = q[:, :1] if model.cls_token is not None else q
    weights = ((queries * attn.scale) @ k.transpose(-2, -1)).softmax(-1).mean(1)
    return weights[:, model.num_prefix_tokens :]
