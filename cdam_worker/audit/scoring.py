"""What each cluster is, how suspicious it looks, and why, in words; the class's score and rank.

A cluster's **suspicion score** (0 to 1) is the larger of two findings:

    score = max(concentration * rarity, excess_other_labels)

- a **mark at an unusual place**: ``concentration * rarity``.
  ``concentration`` is the median over the cluster's images of ``(spot - u) / (1 - u)``, clipped to
  [0, 1], where ``spot`` is the share of an image's class-specific evidence on its one small spot
  (features.py) and ``u = w*w / N`` that share for evidence spread evenly: 0 for even evidence, 1 for
  all of it on one spot. ``rarity`` is the median of the images' ``place_rarity`` (features.py): 1 when
  no other class's images have their evidence near these spots (a corner watermark, a logo along an
  edge). A mark is small, but so are some objects; objects, though, lie where objects usually are;
- **mistakes far beyond the usual**: ``excess_other_labels = (o - b) / (1 - b)``, clipped to [0, 1],
  where ``o`` is the share of the cluster's labelled images that are labelled as another class (the
  model calls them this class) and ``b`` the usual share, the median over the audited classes (0 with
  ``--by label`` or without labels). The clusters are made from the maps alone, so a cluster the model
  gets wrong far more often than the rest of the run is a group of images whose evidence for this class
  looks alike: the signature of a cue that tips other classes' images over (a watermark, a backdoor).

An image's own score is the same formula on its own values (``o`` = 1 if it is labelled as another class).

A cluster is **flagged** when its score is at least ``THRESHOLD`` (0.5) and it holds at least
``MIN_CLUSTER_IMAGES`` images and ``MIN_CLUSTER_SHARE`` of the class; its images are flagged with it. A
**class's score** is the highest score among its clusters large enough to be flagged; the class is
flagged when one of its clusters is. Classes are ranked by score, 1 = most suspicious.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cdam_worker.audit.features import ImageFeatures, spot_width, uniform_spot

THRESHOLD = 0.5
MIN_CLUSTER_IMAGES = 5
MIN_CLUSTER_SHARE = 0.05
FIXED_PLACE_SPREAD = 0.12
"""Spots of a cluster whose positions vary less than this (fraction of the grid, per axis; a robust standard
deviation, the interquartile range / 1.35) are at one place."""
EDGE_ZONE = 0.25
"""Spot centres within this fraction of the grid from an edge lie along that edge."""


@dataclass
class ClusterReport:
    """One cluster of one class, as ``clusters.parquet`` stores it."""

    cluster: int
    size: int
    share: float
    purity: float | None  # share of labelled images whose label is the class (None: no labels)
    prototype: np.ndarray  # (gh, gw) mean class map
    medoid_key: str
    focus: float  # median share of the images' positive evidence on their spot
    concentration: float
    rarity: float  # median place_rarity
    other_labels: float | None  # share of labelled images labelled as another class (None: no labels)
    score: float
    flagged: bool
    centroid_y: float
    centroid_x: float
    spread: float
    border: float
    spot_area: float  # the spot's share of the grid
    place: str  # where the spots are, in words
    member_scores: np.ndarray  # per image, its own score


def describe_cluster(cluster: int, members: np.ndarray, features: ImageFeatures, rarity: np.ndarray, descriptors: np.ndarray,
                     class_maps: np.ndarray, keys: np.ndarray, labels: np.ndarray, class_index: int, usual_other: float, by: str) -> ClusterReport:
    """Statistics, score and flag of the cluster made of ``members`` (indices into the class's images)."""
    grid = class_maps.shape[1:]
    mine = features.take(members)
    labelled = labels[members] >= 0
    purity = float((labels[members][labelled] == class_index).mean()) if labelled.any() else None
    other_labels = None if purity is None or by == "label" else 1.0 - purity
    concentration = concentration_of(mine.spot, grid)
    score = max(float(np.median(concentration) * np.median(rarity[members])), float(excess(other_labels or 0.0, usual_other)))
    other = ((labels[members] != class_index) & labelled).astype(float) if by == "pred" else np.zeros(len(members))
    member_scores = np.maximum(concentration * rarity[members], excess(other, usual_other))
    centre = descriptors[members].mean(axis=0)
    medoid = members[int(np.argmin(((descriptors[members] - centre) ** 2).sum(axis=1)))]
    size = len(members)
    share = size / len(class_maps)
    large_enough = size >= MIN_CLUSTER_IMAGES and share >= MIN_CLUSTER_SHARE
    width = spot_width(grid)
    return ClusterReport(
        cluster=cluster, size=size, share=share, purity=purity, prototype=class_maps[members].mean(axis=0),
        medoid_key=str(keys[medoid]), focus=float(np.median(mine.spot)), concentration=float(np.median(concentration)),
        rarity=float(np.median(rarity[members])), other_labels=other_labels, score=score,
        flagged=large_enough and score >= THRESHOLD,
        centroid_y=float(mine.centroid_y.mean()), centroid_x=float(mine.centroid_x.mean()), spread=float(mine.spread.mean()),
        border=float(mine.border.mean()), spot_area=width * width / (grid[0] * grid[1]),
        place=place_in_words(mine.spot_y, mine.spot_x, grid), member_scores=member_scores,
    )


def concentration_of(spot: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """``(spot - u) / (1 - u)`` clipped to [0, 1]: 0 for evidence spread evenly, 1 for all of it on the spot."""
    floor = uniform_spot(grid)
    return np.clip((spot - floor) / (1.0 - floor), 0.0, 1.0)


def excess(other: np.ndarray | float, usual: float) -> np.ndarray | float:
    """Label disagreement beyond the usual: ``(o - b) / (1 - b)`` clipped to [0, 1]."""
    return np.clip((other - usual) / max(1.0 - usual, 1e-12), 0.0, 1.0)


def class_score(clusters: list[ClusterReport]) -> float:
    """The class's suspicion: the highest score among its clusters large enough to be flagged (0 if none)."""
    eligible = [c.score for c in clusters if c.size >= MIN_CLUSTER_IMAGES and c.share >= MIN_CLUSTER_SHARE]
    return max(eligible, default=0.0)


def reasons_in_words(clusters: list[ClusterReport], n_images: int, by: str) -> str:
    """Why the class scores as it does: its most suspicious cluster (a mark at an unusual place first among
    equals), and how much more is flagged."""
    if not clusters:
        return ""
    top = max(clusters, key=lambda c: (c.flagged, round(c.score, 2), c.concentration * c.rarity))
    who = (f"a coherent cluster of {top.share:.0%} of the images ({top.size} of {n_images}) puts" if len(clusters) > 1
           else f"all {n_images} images (one cluster) put")
    text = f"{who} {top.focus:.0%} of their evidence on {top.spot_area:.0%} of the area, {top.place}"
    if top.rarity >= 0.5:
        text += f", where the other classes' evidence rarely is (rarity {top.rarity:.2f})"
    if top.other_labels is not None:
        text += f"; {top.other_labels:.0%} of those images are labelled as other classes"
    more = [c for c in clusters if c.flagged and c is not top]
    if more:
        text += (f"; {len(more)} more cluster{'s' if len(more) > 1 else ''} flagged, {sum(c.size for c in more)} images "
                 f"({sum(c.share for c in more):.0%} of the class)")
    if not top.flagged:
        text = "nothing above the threshold; the most suspicious: " + text
    return text


def place_in_words(spot_y: np.ndarray, spot_x: np.ndarray, grid: tuple[int, int]) -> str:
    """Where a cluster's spots lie: one place ("at the bottom-right corner"), along an edge, or at varying places."""
    fixed_y = _robust_spread(spot_y) < FIXED_PLACE_SPREAD
    fixed_x = _robust_spread(spot_x) < FIXED_PLACE_SPREAD
    y, x = float(np.median(spot_y)), float(np.median(spot_x))
    vertical = "top" if y < EDGE_ZONE else "bottom" if y > 1 - EDGE_ZONE else ""
    horizontal = "left" if x < EDGE_ZONE else "right" if x > 1 - EDGE_ZONE else ""
    if fixed_y and fixed_x:
        if vertical and horizontal:
            return f"at one place, the {vertical}-{horizontal} corner"
        if vertical or horizontal:
            return f"at one place on the {vertical or horizontal} edge"
        return "at one place inside the image"
    if fixed_y and vertical:
        return f"along the {vertical} edge"
    if fixed_x and horizontal:
        return f"along the {horizontal} edge"
    on_border = _on_border(spot_y, spot_x, grid).mean()
    if on_border >= 0.7:
        return f"at varying places along the border ({on_border:.0%} of the spots touch it)"
    return "at varying places"


def _robust_spread(values: np.ndarray) -> float:
    low, high = np.quantile(values, [0.25, 0.75])
    return float(high - low) / 1.35


def _on_border(spot_y: np.ndarray, spot_x: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Whether each spot (its centre) lies within one spot width of the grid's edge."""
    margin_y = spot_width(grid) / grid[0]
    margin_x = spot_width(grid) / grid[1]
    return (spot_y <= margin_y) | (spot_y >= 1 - margin_y) | (spot_x <= margin_x) | (spot_x >= 1 - margin_x)


