"""The closed form of CDAM (spec section 3): every target for the price of one forward pass.

For a CLS-pooled ViT, patch token i reaches the pooled feature h only through its key and value
in the CLS query's attention of the last block. With ``J = dh/do_cat`` (the CLS path after the
attention: proj, ls1, residual, norm2, MLP, ls2, final norm, fc_norm) and per head

    z_i = (v_i - b_v) + scale * (q0 . (k_i - b_k)) * (v_i - o),     Z_i = concat_heads(a_i * z_i),

the CDAM of any direction g in feature space is ``S_i = g . (J Z_i)``. ``J`` is never materialised:
either the K target rows are pulled back through the CLS path (``p = g^T J``, a batched VJP) or the N
patch columns are pushed forward (``J Z_i``, forward mode with explicit rules per layer, see
``tangents.py``), whichever is fewer.

Keys of the patch tokens are never formed, and values only on the columns route. With t_i = norm1(x_i) and per head
``q0 . (k_i - b_k) = (W_k^T q0) . t_i``, ``o = W_v (sum_i a_i t_i) + b_v`` (the weights sum to 1) and,
on the rows route, ``p . (v_i - b_v) = (W_v^T p) . t_i``, every patch term is a dot product of t_i with
a few D-vectors per head: on the rows route the last block costs O(L D (H + K H)) instead of O(L D^2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from cdam_worker.maps.tangents import push


def closed_form_unsupported_reason(model: nn.Module) -> str | None:
    """Why the closed form does not hold for ``model`` (None when it does)."""
    if getattr(model, "closed_form_unsupported", None):  # a ViT subclass that says why (hf_models.ClsMeanPooledViT)
        return model.closed_form_unsupported
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
    """The last block's CLS-query attention for a batch of last-block inputs, per head."""

    tokens: torch.Tensor  # (B, L, D) t = norm1(X)
    attention: torch.Tensor  # (B, H, L) CLS-row attention weights a over all tokens
    query_dot_keys: torch.Tensor  # (B, H, L) q0 . (k_i - b_k)
    head_outputs: torch.Tensor  # (B, H, d) o per head
    cls_input: torch.Tensor  # (B, D) the CLS token entering the last block (residual)


def _qkv_parts(attn: Attention) -> tuple[torch.Tensor, ...]:
    """W_q, W_k, W_v as (H, d, D) and b_q, b_k, b_v as (H, d) (zeros without a qkv bias)."""
    heads, head_dim = attn.num_heads, attn.head_dim
    weights = attn.qkv.weight.view(3, heads, head_dim, -1)
    bias = attn.qkv.bias if attn.qkv.bias is not None else attn.qkv.weight.new_zeros(3 * heads * head_dim)
    biases = bias.view(3, heads, head_dim)
    return weights[0], weights[1], weights[2], biases[0], biases[1], biases[2]


def last_block_state(model: VisionTransformer, block_input: torch.Tensor) -> LastBlockState:
    """The CLS query's attention in the last block, computed without forming any key or value."""
    attn = model.blocks[-1].attn
    w_q, w_k, w_v, b_q, b_k, b_v = _qkv_parts(attn)
    tokens = model.blocks[-1].norm1(block_input)
    query = torch.einsum("hed,bd->bhe", w_q, tokens[:, 0]) + b_q  # q0 (B, H, d)
    key_probe = torch.einsum("bhe,hed->bhd", query, w_k)  # W_k,h^T q0_h (B, H, D)
    query_dot_keys = torch.einsum("bhd,bld->bhl", key_probe, tokens)
    attention = (attn.scale * (query_dot_keys + (query * b_k).sum(-1, keepdim=True))).softmax(dim=-1)
    mixed_tokens = torch.einsum("bhl,bld->bhd", attention, tokens)  # sum_i a_i t_i per head
    head_outputs = torch.einsum("hed,bhd->bhe", w_v, mixed_tokens) + b_v
    return LastBlockState(tokens, attention, query_dot_keys, head_outputs, block_input[:, 0])


def cls_path(
    model: VisionTransformer, state: LastBlockState, head_outputs: torch.Tensor, tangents: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The CLS token after the last attention: h (B, D) from the concatenated head outputs o (B, A).

    With ``tangents`` (B, N, A) it also returns ``J tangents`` (B, N, D), J = dh/do, each tangent pushed
    forward through the path's linearisation (``tangents.push``). Row-wise in o, so it batches.
    """
    block = model.blocks[-1]
    attn = block.attn
    x, dx = push(attn.norm, head_outputs, tangents)
    if attn.gate is not None:  # the gate reads the CLS token t_0, a constant here
        gate = attn.gate(state.tokens[:, 0]).sigmoid()
        x, dx = x * gate, (dx * gate[:, None] if dx is not None else None)
    for layer in (attn.proj, attn.proj_drop, block.ls1, block.drop_path1):
        x, dx = push(layer, x, dx)
    x = state.cls_input + x  # the residual adds a constant: the tangents pass unchanged
    y, dy = push(block.norm2, x, dx)
    for layer in (block.mlp, block.ls2, block.drop_path2):
        y, dy = push(layer, y, dy)
    x, dx = x + y, (dx + dy if dx is not None else None)
    for layer in (model.norm, model.fc_norm, model.head_drop):
        x, dx = push(layer, x, dx)
    return x, dx


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
    """CDAM for the target directions ``directions_of(h) -> (B, K, D)`` of a batch of last-block inputs.

    Directions that are the same for every image may come as an expanded view (stride 0 over the
    batch): they are then applied to the whole batch in one matrix product.
    """
    state = last_block_state(model, block_input)
    batch, heads, head_dim = state.head_outputs.shape
    head_outputs = state.head_outputs.reshape(batch, heads * head_dim)
    embedding = cls_path(model, state, head_outputs)[0]
    directions = directions_of(embedding)  # (B, K, D)
    n_patches = state.tokens.shape[1] - model.num_prefix_tokens
    basis = None
    if want_basis or directions.shape[1] > n_patches:
        basis = cls_path(model, state, head_outputs, _relevance_inputs(model, state))[1]  # (B, N, D): J Z_i per patch
        maps = maps_from_basis(directions, basis)
    else:
        with torch.enable_grad():
            _, pull_back = torch.func.vjp(lambda o: cls_path(model, state, o)[0], head_outputs)
        pulled = torch.func.vmap(pull_back, in_dims=1, out_dims=1)(directions)[0]  # (B, K, A) = g^T J
        maps = _maps_from_pulled(model, state, pulled.view(batch, -1, heads, head_dim))
    basis = basis.transpose(1, 2) if want_basis else None
    return ClosedFormMaps(maps=maps, basis=basis, embedding=embedding, attention=state.attention)


def _relevance_inputs(model: VisionTransformer, state: LastBlockState) -> torch.Tensor:
    """Z (B, N, A): per head a_i * ((v_i - b_v) + scale * (q0 . (k_i - b_k)) * (v_i - o)), heads concatenated.

    Regrouped as c1_i * (v_i - b_v) + c2_i * (b_v - o) with c1 = a (1 + scale q0.k), c2 = a scale q0.k.
    """
    attn = model.blocks[-1].attn
    _, _, w_v, _, _, b_v = _qkv_parts(attn)
    prefix = model.num_prefix_tokens
    batch, heads, head_dim = state.head_outputs.shape
    values = F.linear(state.tokens[:, prefix:], w_v.reshape(heads * head_dim, -1))  # v_i - b_v (B, N, A)
    key_term = attn.scale * state.query_dot_keys[:, :, prefix:]  # (B, H, N)
    weights = state.attention[:, :, prefix:]
    c1 = (weights * (1 + key_term)).transpose(1, 2)[..., None]  # (B, N, H, 1)
    c2 = (weights * key_term).transpose(1, 2)[..., None]
    z = c1 * values.view(batch, -1, heads, head_dim) + c2 * (b_v - state.head_outputs)[:, None]
    return z.flatten(2)


def maps_from_basis(directions: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """S (B, K, N) = g . B_i for directions g (B, K, D) and basis rows B_i (B, N, D), e.g. J Z_i.

    Directions shared by every image (an expanded view, stride 0 over the batch) take one matrix product.
    """
    if directions.shape[0] > 1 and directions.stride(0) == 0:  # shared by every image: one matrix product
        return (basis @ directions[0].T).transpose(1, 2)
    return directions @ basis.transpose(1, 2)


def _maps_from_pulled(model: VisionTransformer, state: LastBlockState, pulled: torch.Tensor) -> torch.Tensor:
    """S (B, K, N) = sum_h a_i [p . (v_i - b_v) + scale * (q0 . (k_i - b_k)) * p . (v_i - o)] for p = g^T J per head."""
    attn = model.blocks[-1].attn
    _, _, w_v, _, _, b_v = _qkv_parts(attn)
    prefix = model.num_prefix_tokens
    value_probe = torch.einsum("bkhe,hed->bkhd", pulled, w_v)  # W_v,h^T p (B, K, H, D)
    p_dot_values = torch.einsum("bkhd,bnd->bkhn", value_probe, state.tokens[:, prefix:])  # p . (v_i - b_v)
    p_dot_shift = (pulled * (b_v - state.head_outputs)[:, None]).sum(-1, keepdim=True)  # p . (b_v - o)
    keys = state.query_dot_keys[:, None, :, prefix:]
    per_head = state.attention[:, None, :, prefix:] * (p_dot_values + attn.scale * keys * (p_dot_values + p_dot_shift))
    return per_head.sum(2)
