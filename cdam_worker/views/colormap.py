"""The diverging colour map of every view: positive relevance warm, negative cool, zero neutral.

Each map gets its own symmetric scale (``max |value|``), so its colours run from ``-scale`` (deep blue)
through 0 (white, or the image itself in an overlay) to ``+scale`` (deep red). Maps are stored at token
resolution; :func:`upsample` brings them to display pixels, for display only.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# ColorBrewer RdBu, reversed (blue for negative, red for positive), centred on its neutral grey-white.
_ANCHORS = np.array(
    [
        (5, 48, 97),
        (33, 102, 172),
        (67, 147, 195),
        (146, 197, 222),
        (209, 229, 240),
        (247, 247, 247),
        (253, 219, 199),
        (244, 165, 130),
        (214, 96, 77),
        (178, 24, 43),
        (103, 0, 31),
    ],
    dtype=np.float32,
)
LUT_SIZE = 257  # odd, so that 0 has an entry of its own
_LUT = (
    np.stack(
        [np.interp(np.linspace(0, 1, LUT_SIZE), np.linspace(0, 1, len(_ANCHORS)), _ANCHORS[:, c]) for c in range(3)],
        axis=1,
    )
    .round()
    .astype(np.uint8)
)
OVERLAY_OPACITY = 0.85
"""Opacity of the colour at ``|value| = scale`` in an overlay; 0 is fully transparent."""
MISSING_GREY = (128, 128, 128)


def symmetric_scale(values: np.ndarray) -> float:
    """The map's colour scale: its largest absolute finite value (0 for an empty or all-NaN map)."""
    finite = np.abs(values[np.isfinite(values)])
    return float(finite.max()) if finite.size else 0.0


def upsample(values: np.ndarray, width: int, height: int) -> np.ndarray:
    """A (gh, gw) map resized bilinearly to (height, width) pixels, float32."""
    image = Image.fromarray(np.ascontiguousarray(values, dtype=np.float32), mode="F")
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)


def _positions(values: np.ndarray, scale: float) -> np.ndarray:
    """Each value's place on the colour map, in [-1, 1] (NaN stays NaN)."""
    if scale <= 0:
        return np.where(np.isfinite(values), 0.0, np.nan).astype(np.float32)
    return np.clip(values / scale, -1.0, 1.0)


def colorize(values: np.ndarray, scale: float) -> np.ndarray:
    """(..., 3) uint8 colours of ``values`` on the symmetric scale ``[-scale, scale]``; NaN is grey."""
    position = _positions(values, scale)
    index = np.rint((np.nan_to_num(position) + 1.0) * 0.5 * (LUT_SIZE - 1)).astype(np.intp)
    colours = _LUT[index]
    colours[~np.isfinite(position)] = MISSING_GREY
    return colours


def overlay(image: np.ndarray, values: np.ndarray, scale: float) -> np.ndarray:
    """The map over the image (both (H, W, ...)): each pixel's colour at an opacity that grows with
    ``|value| / scale``, so zero relevance leaves the image as it is."""
    position = np.nan_to_num(_positions(values, scale))
    alpha = (OVERLAY_OPACITY * np.abs(position))[..., None]
    blended = image.astype(np.float32) * (1.0 - alpha) + colorize(values, scale).astype(np.float32) * alpha
    return np.rint(blended).astype(np.uint8)


def colorbar(length: int, thickness: int, vertical: bool = True) -> np.ndarray:
    """The colour map as a bar (uint8 RGB): +scale at the top (vertical) or right end (horizontal)."""
    ramp = (
        np.linspace(1.0, -1.0, length, dtype=np.float32)
        if vertical
        else np.linspace(-1.0, 1.0, length, dtype=np.float32)
    )
    colours = colorize(ramp, 1.0)
    return (
        np.repeat(colours[:, None, :], thickness, axis=1)
        if vertical
        else np.repeat(colours[None, :, :], thickness, axis=0)
    )
