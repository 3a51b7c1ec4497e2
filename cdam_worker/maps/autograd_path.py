"""CDAM by autograd through the last block only: the path for models the closed form does not cover.

The literal definition (spec section 1), restricted to the last block and the head: the output of
``blocks[-1].norm1`` becomes a leaf, the target scores are pulled back to it, and each patch's
score is the per-token dot product of activation and gradient. All targets of a chunk run in one
backward pass by replicating the batch, one copy per target slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(logits (R, C), embedding (R, D)) -> target scores (R, K)."""


@dataclass
class LastBlockOutputs:
    logits: torch.Tensor  # (B, C)
    embedding: torch.Tensor  # (B, D)


def head_outputs(model: nn.Module, block_input: torch.Tensor) -> LastBlockOutputs:
    """Logits and pre-logits embedding from the last block's input, exactly as the model computes them."""
    features = model.norm(model.blocks[-1](block_input))
    return LastBlockOutputs(
        logits=model.forward_head(features), embedding=model.forward_head(features, pre_logits=True)
    )


def _outputs_with_leaf(model: nn.Module, block_input: torch.Tensor) -> tuple[torch.Tensor, LastBlockOutputs]:
    """Run the last block and the head with ``norm1``'s output made a leaf that requires grad."""
    captured: dict[str, torch.Tensor] = {}

    def make_leaf(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        captured["tokens"] = output.detach().requires_grad_(True)
        return captured["tokens"]

    handle = model.blocks[-1].norm1.register_forward_hook(make_leaf)
    try:
        with torch.enable_grad():
            outputs = head_outputs(model, block_input.detach())
    finally:
        handle.remove()
    return captured["tokens"], outputs


def autograd_maps(
    model: nn.Module,
    block_input: torch.Tensor,
    score_of: ScoreFn,
    num_targets: int,
    max_rows: int = 256,
) -> torch.Tensor:
    """CDAM (B, K, N) of the K scores ``score_of(logits, embedding)`` by autograd at ``blocks[-1].norm1``.

    Targets are processed in chunks so that at most ``max_rows`` replicated images are in flight.
    """
    batch = block_input.shape[0]
    prefix = model.num_prefix_tokens
    chunk = max(1, max_rows // batch)
    pieces = [block_input.new_zeros(batch, 0, block_input.shape[1] - prefix)]
    for start in range(0, num_targets, chunk):
        slots = torch.arange(start, min(start + chunk, num_targets), device=block_input.device)
        tokens, outputs = _outputs_with_leaf(model, block_input.repeat(len(slots), 1, 1))  # copy s explains slot s
        with torch.enable_grad():
            scores = score_of(outputs.logits, outputs.embedding).view(len(slots), batch, num_targets)
            chosen = scores.gather(2, slots.view(-1, 1, 1).expand(-1, batch, 1)).sum()
            (grad,) = torch.autograd.grad(chosen, tokens)
        relevance = (tokens.detach() * grad).sum(-1)[:, prefix:]  # (S*B, N)
        pieces.append(relevance.view(len(slots), batch, -1).transpose(0, 1))
    return torch.cat(pieces, dim=1)
