"""What each cluster is, where its evidence lies, and why a class is flagged, in words.

The findings come from ``cues.py`` (the maps against the other classes' maps, and label disagreement);
this module describes them:

- a class's **clusters**: first one per kind of finding (``kind`` "mark", "background" or "tipping";
  flagged), holding exactly the images the finding flags, then the spectral clusters (clustering.py)
  of the class's other images (``kind`` "", not flagged);
- per cluster its size, share, label purity, prototype (mean map), medoid, where its spots lie in words,
  how concentrated its evidence is (``focus``: the median share on the image's spot; ``concentration``:
  the same from 0 for evidence spread evenly to 1), the median ``place_rarity`` of its spots
  (features.py), the median share of its images' evidence off the class's usual region (``off_place``)
  and a ``score``: for a finding, the class's effect size of that finding (cues.py), else 0;
- per class **reasons** in words, which name the kind of each finding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cdam_worker.audit.cues import KIND_WORDS, Finding
from cdam_worker.audit.features import ImageFeatures, spot_width, uniform_spot

MIN_CLUSTER_IMAGES = 5
MIN_CLUSTER_SHARE = 0.05
"""A finding needs at least this many images and this share of the class."""
FIXED_PLACE_SPREAD = 0.12
"""Spots of a cluster whose positions vary less than this (fraction of the grid, per axis; a robust standard
deviation, the interquartile range / 1.35) are at one place."""
EDGE_ZONE = 0.25
"""Spot centres within this fraction of the grid from an edge lie along that edge."""
MOST_SPOTS = 0.5
"""A cluster whose spots vary but at least this share of them lie at one position is "mostly at one place"."""


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
    other_labels: float | None  # share of labelled images labelled as another class (None: no labels, or --by label)
    score: float
    flagged: bool
    centroid_y: float
    centroid_x: float
    spread: float
    border: float
    spot_area: float  # the spot's share of the grid
    place: str  # where the spots are, in words
    kind: str  # "mark", "background", "tipping" (a flagged finding) or "" (the class's other images)
    off_place: float  # median share of the images' evidence off the class's usual region (cues.py)


def describe_cluster(
    cluster: int,
    members: np.ndarray,
    features: ImageFeatures,
    rarity: np.ndarray,
    off_place: np.ndarray,
    descriptors: np.ndarray,
    class_maps: np.ndarray,
    keys: np.ndarray,
    labels: np.ndarray,
    class_index: int,
    by: str,
    kind: str,
    score: float,
) -> ClusterReport:
    """Statistics of the cluster made of ``members`` (indices into the class's images), with its finding's
    ``kind`` and ``score`` (a cluster with a kind is flagged)."""
    grid = class_maps.shape[1:]
    mine = features.take(members)
    labelled = labels[members] >= 0
    purity = float((labels[members][labelled] == class_index).mean()) if labelled.any() else None
    other_labels = None if purity is None or by == "label" else 1.0 - purity
    centre = descriptors[members].mean(axis=0)
    medoid = members[int(np.argmin(((descriptors[members] - centre) ** 2).sum(axis=1)))]
    width = spot_width(grid)
    return ClusterReport(
        cluster=cluster,
        size=len(members),
        share=len(members) / len(class_maps),
        purity=purity,
        prototype=class_maps[members].mean(axis=0),
        medoid_key=str(keys[medoid]),
        focus=float(np.median(mine.spot)),
        concentration=float(np.median(concentration_of(mine.spot, grid))),
        rarity=float(np.median(rarity[members])),
        other_labels=other_labels,
        score=score,
        flagged=bool(kind),
        centroid_y=float(mine.centroid_y.mean()),
        centroid_x=float(mine.centroid_x.mean()),
        spread=float(mine.spread.mean()),
        border=float(mine.border.mean()),
        spot_area=width * width / (grid[0] * grid[1]),
        place=place_in_words(mine.spot_y, mine.spot_x, grid),
        kind=kind,
        off_place=float(np.median(off_place[members])),
    )


def concentration_of(spot: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """``(spot - u) / (1 - u)`` clipped to [0, 1]: 0 for evidence spread evenly, 1 for all of it on the spot."""
    floor = uniform_spot(grid)
    return np.clip((spot - floor) / (1.0 - floor), 0.0, 1.0)


def reasons_in_words(finding: Finding, clusters: list[ClusterReport], n_images: int) -> str:
    """Why the class scores as it does: each flagged finding in words (its kind, how many images, where),
    or the strongest signal below the bar."""
    parts = []
    for c in (c for c in clusters if c.flagged):
        text = f"{KIND_WORDS[c.kind]}: {c.size} of {n_images} images ({c.share:.0%})"
        if c.kind == "mark":
            text += (
                f" put {c.focus:.0%} of their evidence on a spot of {c.spot_area:.0%} of the area, {c.place}, "
                f"off where the other classes' evidence lies ({c.off_place:.0%} of it)"
            )
        elif c.kind == "background":
            text += (
                f" have {c.off_place:.0%} of their evidence off where the other classes' evidence lies, spread over the "
                "surroundings rather than on a compact object"
            )
        else:
            text += " are labelled as other classes, far more often than the run's other classes are confused"
        if c.kind != "tipping" and c.other_labels:
            tips = ": the cue tips them over" if finding.tipping_excess > 0 else ""
            text += f"; {c.other_labels:.0%} of them are labelled as other classes{tips}"
        parts.append(text)
    if parts:
        return "; ".join(parts)
    text = (
        f"nothing significant: {finding.place_excess:.0%} more images than expected have their evidence off where the "
        f"other classes' lies (p = {finding.place_p:.2g})"
    )
    if finding.tipping_p < 1.0:
        text += f"; label disagreement p = {finding.tipping_p:.2g}"
    return text


def place_in_words(spot_y: np.ndarray, spot_x: np.ndarray, grid: tuple[int, int]) -> str:
    """Where a cluster's spots lie: one place ("at the bottom-right corner"), mostly at one place, along an
    edge, or at varying places."""
    fixed_y = _robust_spread(spot_y) < FIXED_PLACE_SPREAD
    fixed_x = _robust_spread(spot_x) < FIXED_PLACE_SPREAD
    y, x = float(np.median(spot_y)), float(np.median(spot_x))
    if fixed_y and fixed_x:
        return f"at one place, {_where(y, x)}"
    places, counts = np.unique(np.round(np.column_stack([spot_y, spot_x]) * np.array(grid)), axis=0, return_counts=True)
    if counts.max() >= MOST_SPOTS * len(spot_y):
        top = places[np.argmax(counts)] / np.array(grid)
        return f"mostly at one place, {_where(float(top[0]), float(top[1]))} ({counts.max() / len(spot_y):.0%} of the spots)"
    vertical, horizontal = _edges(y, x)
    if fixed_y and vertical:
        return f"along the {vertical} edge"
    if fixed_x and horizontal:
        return f"along the {horizontal} edge"
    on_border = _on_border(spot_y, spot_x, grid).mean()
    if on_border >= 0.7:
        return f"at varying places along the border ({on_border:.0%} of the spots touch it)"
    return "at varying places"


def _where(y: float, x: float) -> str:
    """A place on the grid in words: a corner, an edge, or inside the image."""
    vertical, horizontal = _edges(y, x)
    if vertical and horizontal:
        return f"the {vertical}-{horizontal} corner"
    if vertical or horizontal:
        return f"on the {vertical or horizontal} edge"
    return "inside the image"


def _edges(y: float, x: float) -> tuple[str, str]:
    """The edges a place on the grid (0..1 each way) lies near: ("top" | "bottom" | "", "left" | "right" | "")."""
    vertical = "top" if y < EDGE_ZONE else "bottom" if y > 1 - EDGE_ZONE else ""
    horizontal = "left" if x < EDGE_ZONE else "right" if x > 1 - EDGE_ZONE else ""
    return vertical, horizontal


def _robust_spread(values: np.ndarray) -> float:
    low, high = np.quantile(values, [0.25, 0.75])
    return float(high - low) / 1.35


def _on_border(spot_y: np.ndarray, spot_x: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Whether each spot (its centre) lies within one spot width of the grid's edge."""
    margin_y = spot_width(grid) / grid[0]
    margin_x = spot_width(grid) / grid[1]
    return (spot_y <= margin_y) | (spot_y >= 1 - margin_y) | (spot_x <= margin_x) | (spot_x >= 1 - margin_x)
