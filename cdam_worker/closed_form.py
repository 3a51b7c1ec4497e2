"""The closed form of CDAM (spec section 3): every target for the price of one forward pass.

For a CLS-pooled ViT, patch token i reaches the pooled feature h only through its key and value
in the CLS query's attention of the last block. With ``J = dh/do_cat`` (the CLS path after the
attention: proj, ls1, residual, norm2, MLP, ls2, final norm, fc_norm) and per head

    z_i = (v_i - b_v) + scale * (q0 . (k_i - b_k)) * (v_i - o),     Z_i = concat_heads(a_i * z_i),

the CDAM of any direction g in feature space is ``S_i = g . (J Z_i)``. ``J`` is never materialised:
either the K target rows are pulled back through the CLS path (``g^T J``, a batched VJP) or the N
patch columns are pushed forward (``J Z_i``, a batched JVP), whichever is fewer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn


def closed_form_unsupported_reason(model: nn.Module) -> str | None:
    """Why the closed form does not hold for ``model`` (None when it does)."""
    if type(model) is not VisionTransformer:
        return f"{type(model).__name__} has its own forward (e.g. a distillation head)"
    if model.cls_token is None or model.global_pool != "token" or model.attn_pool is not None:
        return f"the model pools with global_pool={model.global_pool!r}, not the CLS token"
    block = model.blocks[-1]
    if type(block) is not Block:
        return f"the last block is a {type(block).__name__}, not a pre-norm timm Block"
    if type(block.attn) is not Attention:
        return f"the last attention is a {type(block.attn).__name__}, not timm's plain softmax Attention"
    if not (isinstance(block.attn.q_norm, nn.Identity) and isinstance(block.attn.k_norm, nn.Identity)):
        return "the last attention normalises queries and keys (qk-norm)"
    if not isinstance(model.head, (nn.Linear, nn.Identity)):
        return f"the head is a {type(model.head).__name__}, not a linear layer"
    return None


@dataclass
class LastBlockState:
    """The quantities of the last block's CLS-query attention for a batch of last-block inputs."""

    attention: torch.Tensor  # (B, H, L) CLS-row attention weights over all tokens
    head_outputs: torch.Tensor  # (B, A) concatenated head outputs of the CLS query (o_cat)
    relevance_inputs: torch.Tensor  # (B, N, A) Z_i for the patch tokens
    cls_input: torch.Tensor  # (B, D) the CLS token entering the last block (residual)
    cls_normed: torch.Tensor  # (B, D) norm1 of the CLS token (feeds the optional output gate)


def last_block_state(model: VisionTransformer, block_input: torch.Tensor) -> LastBlockState:
    """Everything the closed form needs from the last block, computing keys/values for all tokens but the query for CLS only."""
    attn = model.blocks[-1].attn
    batch, length, _ = block_input.shape
    heads, head_dim, width = attn.num_heads, attn.head_dim, attn.attn_dim
    tokens = model.blocks[-1].norm1(block_input)
    weight, bias = attn.qkv.weight, attn.qkv.bias
    q_weight, kv_weight = weight[:width], weight[width:]
    q_bias = bias[:width] if bias is not None else None
    kv_bias = bias[width:] if bias is not None else None

    query = nn.functional.linear(tokens[:, 0], q_weight, q_bias).view(batch, heads, head_dim)
    keys_values = nn.functional.linear(tokens, kv_weight)  # without bias: k - b_k, v - b_v
    keys_nb, values_nb = keys_values.view(batch, length, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
    values = values_nb + kv_bias[width:].view(heads, 1, head_dim) if kv_bias is not None else values_nb
    key_bias_term = (query * kv_bias[:width].view(heads, head_dim)).sum(-1, keepdim=True) if kv_bias is not None else 0.0

    query_dot_keys = torch.einsum("bhd,bhld->bhl", query, keys_nb)  # q0 . (k_i - b_k)
    attention = (attn.scale * (query_dot_keys + key_bias_term)).softmax(dim=-1)  # (B, H, L)
    head_out = torch.einsum("bhl,bhld->bhd", attention, values)  # o per head

    prefix = model.num_prefix_tokens
    patch_values = values[:, :, prefix:]
    z = values_nb[:, :, prefix:] + attn.scale * query_dot_keys[:, :, prefix:, None] * (patch_values - head_out[:, :, None])
    relevance_inputs = (attention[:, :, prefix:, None] * z).permute(0, 2, 1, 3).reshape(batch, length - prefix, width)
    return LastBlockState(
        attention=attention,
        head_outputs=head_out.reshape(batch, width),
        relevance_inputs=relevance_inputs,
        cls_input=block_input[:, 0],
        cls_normed=tokens[:, 0],
    )


def cls_path(model: VisionTransformer, state: LastBlockState) -> Callable[[torch.Tensor], torch.Tensor]:
    """The map o_cat -> h of the CLS token after the last attention (row-wise, so it batches)."""
    block = model.blocks[-1]
    attn = block.attn
    gate = attn.gate(state.cls_normed).sigmoid() if attn.gate is not None else None

    def feature(head_outputs: torch.Tensor) -> torch.Tensor:
        mixed = attn.norm(head_outputs)
        if gate is not None:
            mixed = mixed * gate
        x = state.cls_input + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(mixed))))
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        return model.head_drop(model.fc_norm(model.norm(x)))

    return feature


@dataclass
class ClosedFormMaps:
    maps: torch.Tensor  # (B, K, N) CDAM per target direction
    basis: torch.Tensor | None  # (B, D, N) relevance basis J Z^T, when asked for
    embedding: torch.Tensor  # (B, D) pooled pre-logits feature
    attention: torch.Tensor  # (B, H, L)


def closed_form_maps(
    model: VisionTransformer,
    block_input: torch.Tensor,
    directions_of: Callable[[torch.Tensor], torch.Tensor],
    want_basis: bool = False,
) -> ClosedFormMaps:
    """CDAM for the target directions ``directions_of(h) -> (B, K, D)`` of a batch of last-block inputs."""
    state = last_block_state(model, block_input)
    feature = cls_path(model, state)
    z = state.relevance_inputs  # (B, N, A)
    with torch.enable_grad():
        embedding, pull_back = torch.func.vjp(feature, state.head_outputs)
    directions = directions_of(embedding)  # (B, K, D)
    basis = None
    if want_basis or directions.shape[1] > z.shape[1]:
        push_forward = torch.func.vmap(lambda column: torch.func.jvp(feature, (state.head_outputs,), (column,))[1], in_dims=1, out_dims=2)
        basis = push_forward(z)  # (B, D, N) = J Z^T
        maps = torch.einsum("bkd,bdn->bkn", directions, basis)
    else:
        pulled = torch.func.vmap(pull_back, in_dims=1, out_dims=1)(directions)[0]  # (B, K, A) = g^T J
        maps = torch.einsum("bka,bna->bkn", pulled, z)
    return ClosedFormMaps(maps=maps, basis=basis if want_basis else None, embedding=embedding.detach(), attention=state.attention)
