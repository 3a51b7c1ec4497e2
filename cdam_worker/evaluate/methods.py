"""The importance estimators ``cdam evaluate`` compares, and their maps from a model (the run's, or a randomised
copy of it for the sanity checks): every method's map of classes (B, K) of images (B, 3, H, W) as (B, K, N)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.models.vision_transformer import VisionTransformer

from cdam_worker.maps.engine import CDAMExplainer
from cdam_worker.evaluate.attention import (
    attention_rollout,
    chefer_relevance,
    gradient_weighted_attention,
)
from cdam_worker.evaluate.perturb import (
    input_x_gradient,
    integrated_gradients,
    rows_per_pass,
    smoothgrad,
    token_ablation,
)


@dataclass(frozen=True)
class MethodInfo:
    key: str  # what --methods names it
    name: str  # what the tables call it
    cheap: bool  # in the default --methods
    cost: str  # per image, for --help


METHODS = (
    MethodInfo("cdam", "CDAM", True, "stored (or one forward + the closed form)"),
    MethodInfo("tam", "TAM", True, "one forward per patch token (196 for ViT-S/16 at 224 px), without gradient"),
    MethodInfo("am", "AM", True, "stored (or one forward)"),
    MethodInfo("ixg", "Input x gradient", True, "one forward + backward per class"),
    MethodInfo("rollout", "Attention rollout", True, "one forward"),
    MethodInfo("gradattn", "Gradient-weighted attention", True, "one forward + backward per class"),
    MethodInfo("lrp", "Relevance propagation", True, "one forward + backward + relevance pass per class"),
    MethodInfo("ig", "Integrated Gradients", False, "--ig-steps forwards + backwards per class"),
    MethodInfo("smoothgrad", "SmoothGrad", False, "--smoothgrad-samples forwards + backwards per class"),
)
BY_KEY = {m.key: m for m in METHODS}
BY_NAME = {m.name: m for m in METHODS}


def parse_methods(text: str) -> list[str]:
    """Method names from ``--methods``: keys separated by commas, or 'cheap' (the default set) or 'all'."""
    keys: list[str] = []
    for word in (w.strip().lower() for w in text.split(",") if w.strip()):
        if word in ("cheap", "all"):
            keys += [m.key for m in METHODS if m.cheap or word == "all"]
        elif word in BY_KEY:
            keys.append(word)
        else:
            raise ValueError(f"--methods: unknown method {word!r} (known: {', '.join(BY_KEY)}, cheap, all)")
    if not keys:
        raise ValueError("--methods: name at least one method")
    return [m.name for m in METHODS if m.key in keys]


@dataclass(frozen=True)
class MapOptions:
    patch: tuple[int, int]
    grid: tuple[int, int]
    ig_steps: int = 16
    smoothgrad_samples: int = 16
    smoothgrad_noise: float = 0.15  # noise std as a share of each image's value range (Smilkov et al.'s 10-20%)
    seed: int = 0


class ModelMaps:
    """Maps of the model-side methods on one model, in passes sized to the device's memory."""

    def __init__(self, model: VisionTransformer, options: MapOptions, device: torch.device) -> None:
        self.model, self.options, self.device = model, options, device
        self.explainer = CDAMExplainer(model)
        n_tokens = options.grid[0] * options.grid[1] + model.num_prefix_tokens
        self.rows = rows_per_pass(model, n_tokens, device)
        self.rows_with_grad = max(1, self.rows // (3 * len(model.blocks)))  # backward keeps every block's activations

    def __call__(
        self, name: str, images: torch.Tensor, classes: torch.Tensor, rows: list[int] | None = None
    ) -> torch.Tensor:
        """The map of method ``name`` for ``classes`` (B, K) of ``images``: (B, K, N) on the device. ``rows``
        (the images' rows in the run) seed SmoothGrad's noise per image."""
        model, o, n = self.model, self.options, len(images)
        if name == "CDAM":
            return self.explainer.explain(images, classes).cdam.reshape(n, classes.shape[1], -1)
        if name == "TAM":
            _, ablation = token_ablation(model, images, self.rows)
            return ablation.gather(1, classes[:, :, None].expand(-1, -1, ablation.shape[2]))
        if name == "AM":  # the engine's attention, as the run stores it: the last block's, mean over heads
            attention = self.explainer.explain(images, classes[:, :1]).attention.mean(dim=1).reshape(n, 1, -1)
            return attention.expand(-1, classes.shape[1], -1).contiguous()
        if name == "Input x gradient":
            return input_x_gradient(model, images, classes, o.patch, o.grid, self.rows_with_grad).reshape(
                n, classes.shape[1], -1
            )
        if name == "Attention rollout":
            return attention_rollout(model, images, classes, self.rows)
        if name == "Gradient-weighted attention":
            return gradient_weighted_attention(model, images, classes, self.rows_with_grad)
        if name == "Relevance propagation":
            return chefer_relevance(model, images, classes, self.rows_with_grad)
        if name == "Integrated Gradients":
            return integrated_gradients(
                model, images, classes, o.patch, o.grid, o.ig_steps, self.rows_with_grad
            ).reshape(n, classes.shape[1], -1)
        if name == "SmoothGrad":
            noise = self._noise(images, rows if rows is not None else list(range(n)))
            return smoothgrad(model, images, classes, o.patch, o.grid, noise, self.rows_with_grad).reshape(
                n, classes.shape[1], -1
            )
        raise ValueError(f"no model-side map for method {name!r}")

    def _noise(self, images: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """SmoothGrad's draws (B, n, 3, H, W), seeded per image (by its row), scaled to its value range."""
        o = self.options
        draws = torch.stack(
            [
                torch.randn(
                    o.smoothgrad_samples,
                    *images.shape[1:],
                    generator=torch.Generator().manual_seed(o.seed * 1_000_003 + row),
                )
                for row in rows
            ]
        ).to(images.device, images.dtype)
        spread = (images.flatten(1).amax(1) - images.flatten(1).amin(1)).view(-1, 1, 1, 1, 1)
        return draws * spread * o.smoothgrad_noise
