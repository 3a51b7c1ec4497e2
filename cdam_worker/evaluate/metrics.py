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


def _pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    return cosine(a, b)
