"""Device memory budgeting: how many rows (copies of an image's last-block input) one pass of maps may hold.

``max_rows`` when given; 256 on the CPU; on CUDA as many as half the free GPU memory holds, from a safe-side
estimate of one row's peak memory. Maps do not depend on it, only the number of passes does.
"""

from __future__ import annotations

import torch
from torch import nn

CPU_ROWS = 256  # rows (copies of a last-block input) per pass on the CPU
CUDA_MEMORY_SHARE = 0.5  # share of the free GPU memory the rows of one pass may fill


class MemoryBudget:
    """Rows per pass and Smooth/Integrated chunk sizes for ``model``'s last block, computed by ``method``."""

    def __init__(self, model: nn.Module, method: str, max_rows: int | None = None) -> None:
        self.model = model
        self.method = method
        self.max_rows = max_rows

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def rows_per_pass(self, tokens: int) -> int:
        """Rows (copies of a last-block input of ``tokens`` tokens) one pass may hold: ``max_rows``, or sized to the device."""
        if self.max_rows is not None:
            return self.max_rows
        if self.device.type != "cuda":
            return CPU_ROWS
        return max(1, int(CUDA_MEMORY_SHARE * free_cuda_bytes(self.device) // self.bytes_per_row(tokens)))

    def variant_chunks(
        self, batch: int, tokens: int, n_maps: int, noisy: bool, columns: bool = False
    ) -> tuple[int, int]:
        """(images per group, copies per chunk) of Smooth/Integrated CDAM with ``n_maps`` copies per image.

        With ``max_rows`` set or on the CPU, a chunk holds all images of the batch and ``rows // batch`` of
        their copies (groups of ``rows`` images, one copy each, when the batch is larger). On CUDA a group of
        images also keeps its noise (``noisy``) for all copies, so groups and chunks are sized from the free memory.
        ``columns``: the closed form takes its column route (more targets than patches, or the basis).
        """
        if self.max_rows is not None or self.device.type != "cuda":
            rows = self.rows_per_pass(tokens)
            images = min(batch, rows)
            return images, min(n_maps, max(1, rows // images))
        noise = n_maps * tokens * self.model.embed_dim * 4 if noisy else 0  # float32 noise per image
        return chunks_in_budget(
            CUDA_MEMORY_SHARE * free_cuda_bytes(self.device), batch, n_maps, self.bytes_per_row(tokens, columns), noise
        )

    def bytes_per_row(self, tokens: int, columns: bool = False) -> int:
        """Peak memory of one row in a pass, estimated on the safe side from the last block's shapes."""
        block, dim = self.model.blocks[-1], self.model.embed_dim
        mlp_activations = sum(p.numel() for p in block.mlp.parameters()) // dim  # about 2 x hidden per token
        if self.method == "closed_form" and not columns:  # no autograd graph: norm1's output and a few copies of it
            floats = 4 * tokens * dim
        elif self.method == "closed_form":  # and every patch column's tangents through proj, norm2 and the MLP
            floats = tokens * (8 * dim + 2 * mlp_activations)
        else:  # the block's activations kept for the backward pass (attention weights included), and as much again
            floats = 2 * (tokens * (14 * dim + mlp_activations) + 2 * block.attn.num_heads * tokens * tokens)
        return 4 * floats


def chunks_in_budget(budget: float, batch: int, n_maps: int, row_bytes: int, noise_bytes: int) -> tuple[int, int]:
    """(images per group, copies per chunk) whose noise and rows fit ``budget`` bytes; at least one row.

    All copies of as many images as fit (the whole batch when it does); when not even one image's copies
    fit, one image and as many copies as fit.
    """
    images = min(batch, max(1, int(budget // (noise_bytes + n_maps * row_bytes))))
    return images, min(n_maps, max(1, int((budget / images - noise_bytes) // row_bytes)))


def free_cuda_bytes(device: torch.device) -> int:
    """GPU memory free for new tensors: free on the device plus what PyTorch's allocator holds unused."""
    free, _total = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
