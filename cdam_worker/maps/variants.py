"""Smooth and Integrated CDAM (spec section 2) as a wrapper around the vanilla computation, after Captum's
``NoiseTunnel``: the vanilla maps of altered copies of the last block's input (noisy for Smooth, scaled for
Integrated), averaged. Each image's noise is its own stream, seeded by the run seed and the image's key.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ContextManager, Literal

import torch

Variant = Literal["vanilla", "smooth", "integrated"]
DEFAULT_NOISE_LEVEL = {"vanilla": 0.0, "smooth": 0.05, "integrated": 0.0}


@dataclass(frozen=True)
class VariantConfig:
    """Which CDAM: ``vanilla``, ``smooth`` (m noisy copies) or ``integrated`` (m-1 scaled copies)."""

    name: Variant = "vanilla"
    n_samples: int = 50
    noise_level: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in DEFAULT_NOISE_LEVEL:
            raise ValueError(f"unknown variant {self.name!r}: expected vanilla, smooth or integrated")
        if self.name != "vanilla" and self.n_samples < (2 if self.name == "integrated" else 1):
            raise ValueError(
                f"{self.name} CDAM needs n_samples >= {2 if self.name == 'integrated' else 1}, got {self.n_samples}"
            )
        if self.noise_level is not None and self.noise_level < 0:
            raise ValueError(f"noise_level must be >= 0, got {self.noise_level}")

    @property
    def sigma_fraction(self) -> float:
        return DEFAULT_NOISE_LEVEL[self.name] if self.noise_level is None else self.noise_level

    @property
    def n_maps(self) -> int:
        """How many altered inputs are averaged (Integrated drops the k=0 map)."""
        return {"vanilla": 1, "smooth": self.n_samples, "integrated": self.n_samples - 1}[self.name]

    def params(self) -> dict[str, float | int | str]:
        """The parameters that define the maps, for run metadata."""
        if self.name == "vanilla":
            return {"variant": "vanilla"}
        return {
            "variant": self.name,
            "n_samples": self.n_samples,
            "noise_level": self.sigma_fraction,
            "seed": self.seed,
        }


class VariantMaps:
    """Smooth / Integrated CDAM around ``vanilla``, the engine's one pass of maps
    ``(block_input, resolve, concepts, want_basis, with_maps=True) -> pass`` (a dataclass with ``cdam``, ``basis``,
    ``target_class``, ``logits``, ``embedding``, ``attention``). ``chunks(batch, tokens, config, columns)`` sizes the
    groups of images and chunks of copies to the device; the copies run inside ``precision_scope()``.
    """

    def __init__(
        self,
        vanilla: Callable[..., Any],
        chunks: Callable[[int, int, VariantConfig, bool], tuple[int, int]],
        precision_scope: Callable[[], ContextManager],
        num_prefix_tokens: int,
    ) -> None:
        self.vanilla = vanilla
        self.chunks = chunks
        self.precision_scope = precision_scope
        self.num_prefix_tokens = num_prefix_tokens

    def __call__(
        self,
        block_input: torch.Tensor,
        resolve: Callable,
        concepts: tuple,
        want_basis: bool,
        keys: list[str],
        config: VariantConfig,
    ) -> Any:
        """The mean of the vanilla maps of the altered copies of ``block_input`` (B, L, D), one key per image.

        The clean input sets the targets, logits, embedding and attention (float32); the altered copies run in
        ``precision_scope()``, in groups of images and chunks of copies (``chunks``).
        """
        batch, tokens = block_input.shape[:2]
        clean = self.vanilla(block_input, resolve, (), False, with_maps=False)
        columns = want_basis or clean.target_class.shape[1] + len(concepts) > tokens - self.num_prefix_tokens
        images_per_group, copies_per_chunk = self.chunks(batch, tokens, config, columns)
        maps, bases = [], []
        for first in range(0, batch, images_per_group):
            group = slice(first, first + images_per_group)
            group_input, group_targets = block_input[group], clean.target_class[group]
            group_size = group_input.shape[0]
            maps_sum, basis_sum = None, None
            for altered, copies in altered_inputs(group_input, keys[group], config, copies_per_chunk):
                with self.precision_scope():
                    part = self.vanilla(
                        altered, lambda _logits: group_targets.repeat_interleave(copies, dim=0), concepts, want_basis
                    )
                maps_part = part.cdam.float().view(group_size, copies, *part.cdam.shape[1:]).sum(1)
                maps_sum = maps_part if maps_sum is None else maps_sum + maps_part
                if want_basis:
                    basis_part = part.basis.float().view(group_size, copies, *part.basis.shape[1:]).sum(1)
                    basis_sum = basis_part if basis_sum is None else basis_sum + basis_part
            maps.append(maps_sum / config.n_maps)
            bases.append(basis_sum / config.n_maps if want_basis else None)
        return dataclasses.replace(clean, cdam=torch.cat(maps), basis=torch.cat(bases) if want_basis else None)


def altered_inputs(
    block_input: torch.Tensor, keys: Sequence[str], config: VariantConfig, copies_per_chunk: int
) -> Iterator[tuple[torch.Tensor, int]]:
    """Chunks of altered last-block inputs, (B * copies, L, D), image-major, with their copy count.

    Each image's noise is one draw of all its copies from its own stream (:func:`image_noise`), so a map
    depends neither on the batch nor on the chunking.
    """
    batch = block_input.shape[0]
    n_maps = config.n_maps
    noise = None
    if config.sigma_fraction > 0:
        span = block_input.flatten(1).amax(1) - block_input.flatten(1).amin(1)  # (B,)
        noise = block_input.new_empty(batch, n_maps, *block_input.shape[1:])
        for image, key in enumerate(keys):
            image_noise(config.seed, key, noise[image])
        noise.mul_((config.sigma_fraction * span).view(batch, 1, 1, 1))
    for start in range(0, n_maps, copies_per_chunk):
        stop = min(start + copies_per_chunk, n_maps)
        if config.name == "smooth":
            base = block_input[:, None].expand(-1, stop - start, -1, -1)
        else:  # integrated: X_k = (k / m) X for k = 1 .. m-1
            scale = (
                torch.arange(start + 1, stop + 1, device=block_input.device, dtype=block_input.dtype) / config.n_samples
            )
            base = scale.view(1, -1, 1, 1) * block_input[:, None]
        altered = base if noise is None else noise[:, start:stop].add_(base)  # the noise buffer becomes the input
        yield altered.reshape(-1, *block_input.shape[1:]), stop - start


def image_seed(seed: int, key: str) -> int:
    """A 63-bit seed from the run seed and an image key, independent of batch and worker."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") >> 1


def image_noise(seed: int, key: str, out: torch.Tensor) -> torch.Tensor:
    """Fill ``out`` with the standard normal stream of image ``key`` under ``seed``."""
    generator = torch.Generator(device=out.device).manual_seed(image_seed(seed, key))
    return torch.randn(out.shape, generator=generator, out=out)
