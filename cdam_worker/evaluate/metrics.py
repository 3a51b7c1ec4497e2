"""The paper's measures of a saliency map (spec section 5), per map, in numpy; no model, no I/O.

Every function takes maps as rows, (n, N) (one flattened map of N tokens per row) and returns one value per
row; a row with a NaN, or one for which the measure is undefined (an all-zero map), gives NaN.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

COMPACT_THRESHOLD = 0.05
"""A token is "off" when its |score| is below this share of the map's largest |score| (the official notebook's)."""


def compactness(maps: np.ndarray, threshold: float = COMPACT_THRESHOLD) -> np.ndarray:
    """Share of tokens with |s| < threshold * max|s| per map: higher means fewer tokens carry the relevance."""
    magnitude = np.abs(maps)
    peak = magnitude.max(axis=1, keepdims=True)
    share = (magnitude < threshold * peak).mean(axis=1)
    return np.where(peak[:, 0] > 0, share, np.nan)


def gini(maps: np.ndarray) -> np.ndarray:
    """Gini index of |s| per map (0: relevance spread evenly over the tokens; near 1: on one token)."""
    magnitude = np.sort(np.abs(maps), axis=1)
    n = magnitude.shape[1]
    total = magnitude.sum(axis=1)
    weights = 2 * np.arange(1, n + 1) - n - 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (magnitude * weights).sum(axis=1) / (n * total), np.nan)


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of each row of ``a`` with the same row of ``b`` (ties get their mean rank)."""
    return _pearson(rankdata(a, axis=1), rankdata(b, axis=1)) if a.size else np.full(len(a), np.nan)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b``."""
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, (a * b).sum(axis=1) / norms, np.nan)


def deletion_orders(maps: np.ndarray) -> np.ndarray:
    """Token orders for the deletion curves: (n, 2, N), the most relevant first, then the least relevant first
    (relevance is the signed score; ties keep token order)."""
    most_first = np.argsort(-maps, axis=1, kind="stable")
    least_first = np.argsort(maps, axis=1, kind="stable")
    return np.stack([most_first, least_first], axis=1)


def deletion_steps(n_tokens: int, steps: int) -> np.ndarray:
    """How many tokens are removed at each point of a deletion curve: 0, ..., n_tokens in ``steps`` equal steps."""
    return np.rint(np.linspace(0, n_tokens, steps + 1)).astype(np.int64)


def deletion_gap(drops: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """Area between the deletion curves: drops (n, 2, S+1) of the score with the most (index 0) and the least
    (index 1) relevant tokens removed first, at ``removed`` tokens; the area is over the removed share (0..1).

    Positive when removing the tokens the map calls most relevant lowers the score more: larger is better."""
    fraction = removed / removed[-1]
    return np.trapezoid(drops[:, 0] - drops[:, 1], fraction, axis=1)


def curve_area(values: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """Area under curves (n, S+1) over the share of tokens removed (or inserted), ``removed`` tokens per point."""
    return np.trapezoid(values, removed / removed[-1], axis=1)


def ssim(a: np.ndarray, b: np.ndarray, window: int = 7) -> np.ndarray:
    """Structural similarity of each map of ``a`` (n, gh, gw) with the same map of ``b``, each first scaled to
    0..1 (min-max): the mean over every ``window`` x ``window`` patch inside the grid (at most the grid's size,
    odd) of the SSIM formula with the windows' sample variances, K1 = 0.01, K2 = 0.03, data range 1 (as
    scikit-image's ``structural_similarity``). A constant map gives NaN."""
    size = min(window, a.shape[1], a.shape[2])
    size -= 1 - size % 2
    scaled = [_unit_range(m) for m in (a, b)]
    patches = [
        np.lib.stride_tricks.sliding_window_view(m, (size, size), axis=(1, 2)).reshape(*m.shape[:1], -1, size * size)
        for m in scaled
    ]
    mean_a, mean_b = patches[0].mean(-1), patches[1].mean(-1)
    correction = size * size / (size * size - 1) if size > 1 else 1.0
    var_a, var_b = patches[0].var(-1) * correction, patches[1].var(-1) * correction
    covariance = ((patches[0] - mean_a[..., None]) * (patches[1] - mean_b[..., None])).mean(-1) * correction
    c1, c2 = 0.01**2, 0.03**2
    index = ((2 * mean_a * mean_b + c1) * (2 * covariance + c2)) / ((mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2))
    return index.mean(axis=1)


def bootstrap_interval(
    values: np.ndarray, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (1-d, finite): (NaN, NaN) for fewer than 2 values."""
    if len(values) < 2:
        return float("nan"), float("nan")
    means = values[np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def _unit_range(maps: np.ndarray) -> np.ndarray:
    low = maps.min(axis=(1, 2), keepdims=True)
    spread = maps.max(axis=(1, 2), keepdims=True) - low
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(spread > 0, (maps - low) / spread, np.nan)


def _pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    return cosine(a, b)
