"""Push many tangent vectors through a layer at one point: the forward-mode step of the closed form.

``push(module, x, dx)`` returns ``(module(x), J dx)`` for a primal batch ``x`` (B, D) and tangents
``dx`` (B, N, D): N directions per row, each multiplied by the layer's Jacobian at that row.
Linear layers, LayerNorm, RmsNorm, LayerScale, timm's ``Mlp`` (any elementwise activation) and layers
that are the identity at inference get explicit rules, so the N tangents cost one matrix product per
linear layer. Any other layer falls back to ``torch.func.jvp`` vectorised over the N tangents.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm, LayerScale, Mlp, RmsNorm
from torch import nn


def push(module: nn.Module, x: torch.Tensor, dx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(module(x), J(x) dx)`` for ``x`` (B, D) and tangents ``dx`` (B, N, D); ``(module(x), None)`` without tangents."""
    if dx is None:
        return module(x), None
    if _is_identity(module):
        return x, dx
    if type(module) is nn.Linear:
        return module(x), F.linear(dx, module.weight)
    if type(module) is LayerScale:
        return x * module.gamma, dx * module.gamma
    if type(module) in (nn.LayerNorm, LayerNorm, RmsNorm) and len(module.normalized_shape) == 1:
        return module(x), _norm_tangents(module, x, dx)
    if type(module) is Mlp and type(module.fc1) is nn.Linear:
        return _mlp_push(module, x, dx)
    return _generic_push(module, x, dx)


def _is_identity(module: nn.Module) -> bool:
    """Layers that pass their input through unchanged (dropout and drop-path at inference)."""
    return isinstance(module, nn.Identity) or (type(module) in (nn.Dropout, DropPath) and not module.training)


def _norm_tangents(norm: nn.Module, x: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """LayerNorm: w * rstd * (dxc - x_hat * mean(x_hat * dx)) with dxc = dx - mean(dx); RmsNorm: the same, uncentred."""
    centre = not isinstance(norm, RmsNorm)
    if centre:
        x = x - x.mean(-1, keepdim=True)
        dx = dx - dx.mean(-1, keepdim=True)
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
    x_hat = (x * rstd)[:, None]  # (B, 1, D)
    out = (dx - x_hat * (x_hat * dx).mean(-1, keepdim=True)).mul_(rstd[:, None])
    return out.mul_(norm.weight) if norm.weight is not None else out


def _mlp_push(mlp: Mlp, x: torch.Tensor, dx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fc1, the activation (elementwise: its slope at the primal scales the tangents), norm, fc2."""
    hidden, d_hidden = push(mlp.fc1, x, dx)
    activated, slope = _jvp(mlp.act, (hidden,), (torch.ones_like(hidden),))
    d_hidden.mul_(slope[:, None])  # fc1 is a Linear: its tangents are a fresh tensor
    for layer in (mlp.drop1, mlp.norm, mlp.fc2, mlp.drop2):
        activated, d_hidden = push(layer, activated, d_hidden)
    return activated, d_hidden


def _generic_push(module: nn.Module, x: torch.Tensor, dx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Any row-wise layer: forward-mode autodiff, vectorised over the N tangents."""
    tangents = torch.func.vmap(lambda tangent: _jvp(module, (x,), (tangent,))[1], in_dims=1, out_dims=1)(dx)
    return module(x), tangents


def _jvp(
    function: Callable[..., torch.Tensor], primals: tuple[torch.Tensor, ...], tangents: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.func.jvp``, its first call in this process made without the noise of that call."""
    _first_jvp()
    return torch.func.jvp(function, primals, tangents)


@functools.cache
def _first_jvp() -> None:
    """torch.func.jvp's first call scripts torch's own jvp decompositions with the deprecated
    ``torch.jit.script``, whose FutureWarning (printed by every actor) is nothing a user can act on: make
    that call once, with the warning silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit\._script")
        torch.func.jvp(torch.sin, (torch.zeros(1),), (torch.ones(1),))
