"""The model-side baselines and tests of the evaluation: token ablation (TAM), token deletion and insertion, and
the gradient estimators on the input pixels (input x gradient, Integrated Gradients, SmoothGrad).

Removing a token means what the spec says (section 5): the patch token is dropped from the sequence right
after the positional embedding, and the rest of the network runs on the shorter sequence (the model's own
``norm_pre``, blocks, norm and head, so average-pooled models average over the tokens left). Many removals
run as one batch: every row is an image's embedded tokens gathered at the indices it keeps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

DEFAULT_ROWS = 256
"""Sequences per forward pass (rows of removals, or image copies for input x gradient) unless sized by ``rows_per_pass``."""
CPU_BUDGET = 1 << 30  # bytes of activations one pass may hold on the CPU; on CUDA a quarter of the free memory


def check_device(name: str) -> torch.device:
    """``--device NAME`` of the reading commands that run the model: cpu, or cuda[:N] where CUDA is usable; RunError
    (one line) otherwise."""
    from cdam_worker.reading import RunError

    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise RunError(f"--device {name!r}: {error}") from None
    if device.type not in ("cpu", "cuda") or (device.type == "cuda" and not torch.cuda.is_available()):
        raise RunError(
            f"--device {name!r}: use cpu, or cuda where torch.cuda.is_available() (it is {torch.cuda.is_available()} here)"
        )
    return device


def rows_per_pass(model: VisionTransformer, n_tokens: int, device: torch.device) -> int:
    """Sequences of ``n_tokens`` one forward pass may hold: a block's activations of that many fit the budget."""
    block = model.blocks[-1]
    hidden = getattr(getattr(block.mlp, "fc1", None), "out_features", 4 * model.embed_dim)
    per_row = 4 * n_tokens * (6 * model.embed_dim + hidden + 2 * block.attn.num_heads * n_tokens)
    budget = torch.cuda.mem_get_info(device)[0] // 4 if device.type == "cuda" else CPU_BUDGET
    return int(max(1, min(4096, budget // per_row)))


@torch.no_grad()
def embedded_tokens(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """The tokens right after the positional embedding (B, P + N, D): prefix tokens first, then the patches."""
    return model.patch_drop(model._pos_embed(model.patch_embed(images)))


@torch.no_grad()
def logits_keeping(
    model: VisionTransformer,
    tokens: torch.Tensor,
    image: torch.Tensor,
    keep: torch.Tensor,
    max_rows: int = DEFAULT_ROWS,
) -> torch.Tensor:
    """Logits (R, C) of R sequences: row r keeps tokens ``keep[r]`` (indices into the P + N tokens) of image ``image[r]``."""
    out = []
    for start in range(0, len(keep), max_rows):
        rows = slice(start, start + max_rows)
        x = tokens[image[rows, None], keep[rows]]  # (r, L', D)
        x = model.norm(model.blocks(model.norm_pre(x)))
        out.append(model.forward_head(x))
    return torch.cat(out) if out else tokens.new_zeros(0, model.num_classes)


@torch.no_grad()
def token_ablation(
    model: VisionTransformer, images: torch.Tensor, max_rows: int = DEFAULT_ROWS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ablation: (logits (B, C), drops (B, C, N)) where drops[b, c, i] = f_c(image b) - f_c(image b without
    patch token i). The token ablation map (TAM) of class c is drops[:, c] on the patch grid."""
    tokens = embedded_tokens(model, images)
    batch, length, _ = tokens.shape
    prefix = model.num_prefix_tokens
    n_patches = length - prefix
    patches = torch.arange(n_patches, device=tokens.device)
    others = patches.expand(n_patches, -1)[patches[:, None] != patches[None]].view(
        n_patches, n_patches - 1
    )  # row i: all but i
    keep = torch.cat([torch.arange(prefix, device=tokens.device).expand(n_patches, -1), others + prefix], dim=1)
    image = torch.arange(batch, device=tokens.device).repeat_interleave(n_patches)
    logits = model(images)
    ablated = logits_keeping(model, tokens, image, keep.repeat(batch, 1), max_rows).view(batch, n_patches, -1)
    return logits, (logits[:, None] - ablated).transpose(1, 2)


@torch.no_grad()
def deletion_curves(
    model: VisionTransformer,
    images: torch.Tensor,
    classes: torch.Tensor,
    orders: torch.Tensor,
    removed: torch.Tensor,
    max_rows: int = DEFAULT_ROWS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deletion curves: (logits, probabilities), each (B, R, S+1): the logit of ``classes[b]`` (B,), and its
    softmax probability, when the first ``removed[s]`` patch tokens of ``orders[b, r]`` (B, R, N) are removed.
    One batch per step, over every image and order. (Inserting the k most relevant tokens is removing all but
    them: the least-relevant-first order's point at N - k.)"""
    tokens = embedded_tokens(model, images)
    batch = tokens.shape[0]
    prefix = model.num_prefix_tokens
    n_orders = orders.shape[1]
    image = torch.arange(batch, device=tokens.device).repeat_interleave(n_orders)
    prefix_index = torch.arange(prefix, device=tokens.device).expand(batch * n_orders, -1)
    wanted = classes.repeat_interleave(n_orders)[:, None]
    scores, probabilities = [], []
    for k in removed.tolist():
        kept = orders.reshape(batch * n_orders, -1)[:, k:].sort(dim=1).values + prefix  # patches left, in their order
        logits = logits_keeping(model, tokens, image, torch.cat([prefix_index, kept], dim=1), max_rows)
        scores.append(logits.gather(1, wanted)[:, 0])
        probabilities.append(logits.softmax(dim=1).gather(1, wanted)[:, 0])
    return torch.stack(scores, dim=1).view(batch, n_orders, -1), torch.stack(probabilities, dim=1).view(
        batch, n_orders, -1
    )


def input_x_gradient(
    model: VisionTransformer,
    images: torch.Tensor,
    classes: torch.Tensor,
    patch: tuple[int, int],
    grid: tuple[int, int],
    max_rows: int = DEFAULT_ROWS,
) -> torch.Tensor:
    """Input x gradient of the logit of each ``classes[b, k]`` (B, K), summed over channels and over each token's
    pixels (``patch`` pixels per token, a ``grid`` of tokens): (B, K, gh, gw)."""
    copies, wanted = (
        images.repeat_interleave(classes.shape[1], dim=0),
        classes.reshape(-1),
    )  # row b * K + k: classes[b, k]
    gradients = mean_gradient(model, copies, wanted, 1, lambda x, step, rows: x, max_rows)
    return per_token(copies * gradients, patch, grid).view(*classes.shape, *grid)


def integrated_gradients(
    model: VisionTransformer,
    images: torch.Tensor,
    classes: torch.Tensor,
    patch: tuple[int, int],
    grid: tuple[int, int],
    steps: int,
    max_rows: int = DEFAULT_ROWS,
) -> torch.Tensor:
    """Integrated Gradients (Sundararajan et al., 2017) from the all-zero input (the mean image after the
    model's normalisation) in ``steps`` midpoint steps: x * mean_s grad f_c((s + 1/2) / steps * x), summed per
    token: (B, K, gh, gw)."""
    copies, wanted = images.repeat_interleave(classes.shape[1], dim=0), classes.reshape(-1)
    alphas = (torch.arange(steps, device=images.device, dtype=images.dtype) + 0.5) / steps
    gradients = mean_gradient(
        model, copies, wanted, steps, lambda x, step, rows: x * alphas[step].view(-1, 1, 1, 1), max_rows
    )
    return per_token(copies * gradients, patch, grid).view(*classes.shape, *grid)


def smoothgrad(
    model: VisionTransformer,
    images: torch.Tensor,
    classes: torch.Tensor,
    patch: tuple[int, int],
    grid: tuple[int, int],
    noise: torch.Tensor,
    max_rows: int = DEFAULT_ROWS,
) -> torch.Tensor:
    """SmoothGrad (Smilkov et al., 2017) times the input: x * mean_j grad f_c(x + noise[b, j]), with ``noise``
    (B, n, 3, H, W) (the same draws for every class of an image), summed per token: (B, K, gh, gw)."""
    n_classes, n_draws = classes.shape[1], noise.shape[1]
    copies, wanted = images.repeat_interleave(n_classes, dim=0), classes.reshape(-1)
    draws = noise.repeat_interleave(n_classes, dim=0).flatten(0, 1)  # row (b * K + k) * n + j
    gradients = mean_gradient(model, copies, wanted, n_draws, lambda x, step, rows: x + draws[rows], max_rows)
    return per_token(copies * gradients, patch, grid).view(*classes.shape, *grid)


def mean_gradient(
    model: VisionTransformer,
    inputs: torch.Tensor,
    wanted: torch.Tensor,
    n_points: int,
    point: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    max_rows: int,
) -> torch.Tensor:
    """Per input row r, the gradient of the logit of class ``wanted[r]`` averaged over ``n_points`` points
    ``point(inputs[r], j, r * n_points + j)`` (j = 0..n_points-1), in passes of ``max_rows``: (R, 3, H, W)."""
    total = torch.zeros_like(inputs)
    rows = torch.arange(len(inputs) * n_points, device=inputs.device)
    for start in range(0, len(rows), max_rows):
        chunk = rows[start : start + max_rows]
        source, step = chunk // n_points, chunk % n_points
        x = point(inputs[source], step, chunk).detach().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(model(x).gather(1, wanted[source, None]).sum(), x)
        total.index_add_(0, source, grad)
    return total / n_points


def per_token(pixels: torch.Tensor, patch: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """Pixel scores (R, 3, H, W) summed over channels and over each token's ``patch`` pixels: (R, gh * gw)
    (an image larger than the grid's pixels is cut, a smaller one padded, as the patch embedding does)."""
    (ph, pw), (gh, gw) = patch, grid
    per_pixel = pixels.sum(1)[:, : gh * ph, : gw * pw]
    per_pixel = F.pad(per_pixel, (0, gw * pw - per_pixel.shape[2], 0, gh * ph - per_pixel.shape[1]))  # a padded border
    return per_pixel.reshape(-1, gh, ph, gw, pw).sum((2, 4)).reshape(len(pixels), gh * gw)
