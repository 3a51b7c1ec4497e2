"""Each forward-mode rule of ``tangents.push`` against ``torch.func.jvp`` on the same layer."""

from __future__ import annotations

import pytest
import torch
from timm.layers import GluMlp, LayerNorm, LayerScale, Mlp, RmsNorm, SwiGLU
from timm.layers.activations import QuickGELU
from torch import nn

from cdam_worker.maps.tangents import push

DIM = 24


def layers() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    cases = {
        "linear": nn.Linear(DIM, DIM),
        "torch_layer_norm": nn.LayerNorm(DIM),
        "timm_layer_norm": LayerNorm(DIM),
        "layer_norm_no_affine": nn.LayerNorm(DIM, elementwise_affine=False),
        "rms_norm": RmsNorm(DIM),
        "layer_scale": LayerScale(DIM, init_values=0.3),
        "mlp_gelu": Mlp(DIM, 2 * DIM, act_layer=nn.GELU),
        "mlp_gelu_tanh_with_norm": Mlp(
            DIM, 2 * DIM, act_layer=lambda: nn.GELU(approximate="tanh"), norm_layer=nn.LayerNorm
        ),
        "mlp_quick_gelu": Mlp(DIM, 2 * DIM, act_layer=QuickGELU),
        "swiglu (generic fallback)": SwiGLU(DIM, 2 * DIM),
        "glu_mlp (generic fallback)": GluMlp(DIM, 2 * DIM),
        "dropout_eval": nn.Dropout(0.5),
    }
    with torch.no_grad():  # no parameter at its initial special value (ones, zeros)
        for module in cases.values():
            for parameter in module.parameters():
                parameter.add_(0.3 * torch.randn_like(parameter))
    return {name: module.eval() for name, module in cases.items()}


@pytest.mark.parametrize("name", sorted(layers()))
def test_push_matches_jvp(name):
    module = layers()[name]
    generator = torch.Generator().manual_seed(1)
    x = 2 * torch.randn(3, DIM, generator=generator) + 0.5
    dx = torch.randn(3, 5, DIM, generator=generator)
    with torch.no_grad():
        out, tangents = push(module, x, dx)
        expected = torch.stack([torch.func.jvp(module, (x,), (dx[:, n],))[1] for n in range(dx.shape[1])], dim=1)
        assert torch.allclose(out, module(x), atol=1e-6)
        assert (tangents - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_push_without_tangents_is_the_forward():
    module = layers()["mlp_gelu"]
    x = torch.randn(2, DIM)
    out, tangents = push(module, x, None)
    assert tangents is None and torch.equal(out, module(x))
