"""Per-image features of a class's CDAM map: where its class-specific evidence lies, and how concentrated.

CDAM is signed and class-specific, so a map says more than "where the model looks": it says which
tokens argue *for* this class. A shortcut (a watermark, a logo, a tag) shows as evidence for the class on
a few tokens. The features are computed from the **contrast** of the class map with the image's
competing classes (its other stored class targets):

    E = max(m - mean(r), 0)

the class map ``m`` minus, token by token, the mean map ``r`` of the competitors (the CDAM of the logit
margin "this class rather than the others", since CDAM is linear in the target direction); with no
competitor stored, ``E = max(m, 0)``. Evidence an object part gives to several classes cancels; what
speaks for this class stays. ``P = E / sum(E)`` is its distribution over the token grid.

Features (all per image, vectorised over images):

- ``spot``: the largest share of ``P`` inside one ``w x w`` window of tokens (``w = spot_width(grid)``,
  2 for grids up to 17 tokens a side): "how much of the evidence sits on one small spot", wherever it
  is. This is translation-invariant, so a mark that moves is seen as well as one at a fixed place;
- ``spot_y``, ``spot_x``: the spot's centre (fractions of the grid height and width);
- ``profile``: the shares of ``P`` on the 1, 2, 4, 8 and 16 largest tokens (the sorted, pooled shape of
  the distribution; translation-invariant);
- ``area``: the effective share of the grid carrying the evidence, ``1 / (N * sum(P**2))``;
- ``border``: the share of ``P`` on the outermost ring of tokens;
- ``centroid_y``, ``centroid_x``, ``spread``: the centre of mass of ``P`` and its radius (fractions of
  the grid), for "where the evidence lies";
- ``pooled``: ``P`` average-pooled onto a 4 x 4 grid (fixed places: a corner watermark);
- ``share``: ``P`` itself (float32), which ``cues.py`` compares with the other classes' images;
- ``competitors``: how many competitor maps the image has stored (0: ``E`` is the map itself, not what
  is specific to the class, and ``cues.py`` does not test where it lies);
- ``rival_share``: the strongest competitor's positive evidence against the class's own,
  ``R / (R + M)`` with ``M = sum(max(m, 0))`` and ``R`` the largest ``sum(max(r, 0))`` over the
  competitors (0 without any). A prediction a mark tipped over wins with little evidence of its own
  while the competitor the image really shows keeps a lot.

One feature compares an image with the rest of the run: ``place_rarity``, how rarely the images of the
*other* classes have their spot near this image's spot (0: as often as usual, 1: never). Objects'
evidence lies where objects usually are; a watermark in a corner or a logo along an edge lies where
no other class's evidence does.

The clustering descriptor (``descriptor``) stacks these with ``place_rarity``, so images group by the
shape of their evidence (invariant part) and, more weakly, by where it is (pooled part).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

POOLED_SIDE = 4
PROFILE_TOKENS = (1, 2, 4, 8, 16)
POOLED_WEIGHT = 0.5
"""Weight of the 16 pooled location features in the descriptor, against 1 for every other feature."""


def spot_width(grid: tuple[int, int]) -> int:
    """Side, in tokens, of the window a mark is looked for in: about a seventh of the grid, at least 2."""
    return max(2, round(min(grid) / 7))


def border_mask(grid: tuple[int, int]) -> np.ndarray:
    """(gh, gw) bool: the outermost ring of tokens."""
    mask = np.ones(grid, dtype=bool)
    mask[1:-1, 1:-1] = False
    return mask


@dataclass
class ImageFeatures:
    """Features of n images' class maps (one value, or row, per image)."""

    spot: np.ndarray
    spot_y: np.ndarray
    spot_x: np.ndarray
    profile: np.ndarray  # (n, len(PROFILE_TOKENS))
    area: np.ndarray
    border: np.ndarray
    centroid_y: np.ndarray
    centroid_x: np.ndarray
    spread: np.ndarray
    rival_share: np.ndarray
    pooled: np.ndarray  # (n, POOLED_SIDE**2)
    share: np.ndarray  # (n, gh, gw) float32: ``P`` itself, for the run-relative statistics (cues.py)
    competitors: np.ndarray  # (n,) int: the image's stored competitor maps (0: ``E`` is not class-specific)

    def take(self, index: np.ndarray) -> ImageFeatures:
        """The features of a subset of the images."""
        return ImageFeatures(**{name: value[index] for name, value in vars(self).items()})

    @staticmethod
    def concatenate(parts: list[ImageFeatures]) -> ImageFeatures:
        """The features of several groups of images, one after the other."""
        return ImageFeatures(**{name: np.concatenate([vars(part)[name] for part in parts]) for name in vars(parts[0])})

    def descriptor(self, rarity: np.ndarray) -> np.ndarray:
        """(n, F) float64 vectors for clustering (with each image's ``place_rarity``), each feature standardised over these images."""
        columns = np.column_stack(
            [
                self.spot,
                self.spot_y,
                self.spot_x,
                self.profile,
                np.log(self.area),
                self.border,
                self.centroid_y,
                self.centroid_x,
                self.spread,
                self.rival_share,
                rarity,
            ]
        )
        standard = _standardise(columns)
        pooled = _standardise(self.pooled) * POOLED_WEIGHT
        return np.concatenate([standard, pooled], axis=1)


def contrast_evidence(class_maps: np.ndarray, rival_maps: np.ndarray) -> np.ndarray:
    """(n, gh, gw): ``E = max(m - mean(r), 0)``, the class map against the mean of the image's competitors.

    ``rival_maps`` is (n, R, gh, gw) with NaN where an image has fewer competitors (R may be 0); an image
    without any gets ``max(m, 0)``.
    """
    present = ~np.isnan(rival_maps[:, :, 0, 0]) if rival_maps.shape[1] else np.zeros((len(class_maps), 0), dtype=bool)
    counts = present.sum(axis=1)
    mean = np.nan_to_num(rival_maps).sum(axis=1) / np.maximum(counts, 1)[:, None, None]
    return np.clip(class_maps - mean, 0, None)


def target_shares(maps: np.ndarray, stored: np.ndarray) -> np.ndarray:
    """(n, T, gh, gw) float16: every stored map's evidence distribution ``P`` against the mean of the image's other
    stored maps (``contrast_evidence`` for each of its targets at once); 0 where ``stored`` (n, T) is False, uniform
    for a stored map without evidence. ``cues.py`` reads from it where a class's evidence lies in other classes' images."""
    n, _, gh, gw = maps.shape
    present = stored[:, :, None, None]
    values = np.where(present, maps.astype(np.float64), 0.0)
    rivals = stored.sum(axis=1)[:, None, None, None] - 1
    mean = (values.sum(axis=1, keepdims=True) - values) / np.maximum(rivals, 1)
    contrast = np.clip(values - np.where(rivals > 0, mean, 0.0), 0, None)
    evidence = contrast.sum(axis=(2, 3), keepdims=True)
    share = np.where(evidence > 0, contrast / np.maximum(evidence, 1e-30), 1.0 / (gh * gw))
    return np.where(present, share, 0.0).astype(np.float16)


def image_features(class_maps: np.ndarray, rival_maps: np.ndarray) -> ImageFeatures:
    """Features of each image's class map ``class_maps`` (n, gh, gw) against its competitors ``rival_maps``
    (n, R, gh, gw, NaN-padded)."""
    class_maps = class_maps.astype(np.float64)
    n, gh, gw = class_maps.shape
    rival_maps = rival_maps.astype(np.float64)
    contrast = contrast_evidence(class_maps, rival_maps)
    own = np.clip(class_maps, 0, None).sum(axis=(1, 2))
    rival = np.clip(np.nan_to_num(rival_maps), 0, None).sum(axis=(2, 3)).max(axis=1, initial=0.0)
    evidence = contrast.sum(axis=(1, 2))
    # An image without evidence gets a uniform distribution: no spot, nothing concentrated.
    share = np.where(
        evidence[:, None, None] > 0, contrast / np.maximum(evidence, 1e-30)[:, None, None], 1.0 / (gh * gw)
    )

    width = spot_width((gh, gw))
    windows = window_sums(share, width).reshape(n, (gh - width + 1) * (gw - width + 1))
    best = windows.argmax(axis=1)
    wy, wx = np.unravel_index(best, (gh - width + 1, gw - width + 1))
    spot = windows[np.arange(n), best]

    ordered = -np.sort(-share.reshape(n, gh * gw), axis=1)
    cumulative = np.cumsum(ordered, axis=1)
    profile = cumulative[:, [min(k, gh * gw) - 1 for k in PROFILE_TOKENS]]

    y = (np.arange(gh) + 0.5) / gh
    x = (np.arange(gw) + 0.5) / gw
    centroid_y = (share.sum(axis=2) * y).sum(axis=1)
    centroid_x = (share.sum(axis=1) * x).sum(axis=1)
    distance2 = (y[None, :, None] - centroid_y[:, None, None]) ** 2 + (
        x[None, None, :] - centroid_x[:, None, None]
    ) ** 2
    return ImageFeatures(
        spot=spot,
        spot_y=(wy + width / 2) / gh,
        spot_x=(wx + width / 2) / gw,
        profile=profile,
        area=1.0 / (gh * gw * (share**2).sum(axis=(1, 2))),
        border=(share * border_mask((gh, gw))).sum(axis=(1, 2)),
        centroid_y=centroid_y,
        centroid_x=centroid_x,
        spread=np.sqrt((share * distance2).sum(axis=(1, 2))),
        rival_share=rival / np.maximum(rival + own, 1e-30),
        pooled=_pool(share, POOLED_SIDE).reshape(n, POOLED_SIDE * POOLED_SIDE),
        share=share.astype(np.float32),
        competitors=(~np.isnan(rival_maps[:, :, 0, 0])).sum(axis=1)
        if rival_maps.shape[1]
        else np.zeros(n, dtype=np.int64),
    )


def place_rarity(spot_y: np.ndarray, spot_x: np.ndarray, classes: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Per image: ``1 - F / F_usual``, clipped to [0, 1], where ``F`` is the share of the other classes'
    images whose spot lies within one spot width of this image's spot, and ``F_usual`` the median of that
    share over those other images themselves. A 2-D histogram of spot positions, so O(images + classes x grid)."""
    width = spot_width(grid)
    rows, cols = grid[0] - width + 1, grid[1] - width + 1
    wy = np.clip(np.rint(spot_y * grid[0] - width / 2).astype(np.int64), 0, rows - 1)
    wx = np.clip(np.rint(spot_x * grid[1] - width / 2).astype(np.int64), 0, cols - 1)
    everyone = _near_counts(wy, wx, (rows, cols), width)
    rarity = np.zeros(len(classes))
    for c in np.unique(classes):
        mine = classes == c
        others = len(classes) - mine.sum()
        if others == 0:
            continue
        near_others = (everyone - _near_counts(wy[mine], wx[mine], (rows, cols), width))[wy, wx] / others  # (n,)
        usual = np.median(near_others[~mine])
        rarity[mine] = np.clip(1.0 - near_others[mine] / max(usual, 1e-12), 0.0, 1.0)
    return rarity


def _near_counts(wy: np.ndarray, wx: np.ndarray, shape: tuple[int, int], width: int) -> np.ndarray:
    """(rows, cols): how many of the spots (window corners wy, wx) lie within ``width`` of each position."""
    counts = np.zeros(shape)
    np.add.at(counts, (wy, wx), 1.0)
    padded = np.pad(counts, width)
    side = 2 * width + 1
    return window_sums(padded[None], side)[0]


def uniform_spot(grid: tuple[int, int]) -> float:
    """The ``spot`` of evidence spread evenly over the grid: the floor every score is measured from."""
    width = spot_width(grid)
    return width * width / (grid[0] * grid[1])


def window_sums(values: np.ndarray, width: int) -> np.ndarray:
    """Sums of every ``width x width`` window of each (gh, gw) map, by a summed-area table."""
    table = np.pad(values.cumsum(axis=1).cumsum(axis=2), ((0, 0), (1, 0), (1, 0)))
    return table[:, width:, width:] - table[:, :-width, width:] - table[:, width:, :-width] + table[:, :-width, :-width]


def _pool(values: np.ndarray, side: int) -> np.ndarray:
    """Average each (gh, gw) map onto a ``side x side`` grid (bins of nearly equal size)."""
    n, gh, gw = values.shape
    rows = np.minimum(np.arange(gh) * side // gh, side - 1)
    cols = np.minimum(np.arange(gw) * side // gw, side - 1)
    pooled = np.zeros((n, side, side))
    np.add.at(pooled, (slice(None), rows[:, None], cols[None, :]), values)
    counts = np.zeros((side, side))
    np.add.at(counts, (rows[:, None], cols[None, :]), 1.0)
    return pooled / np.maximum(counts, 1.0)


def _standardise(columns: np.ndarray) -> np.ndarray:
    """Each column centred and scaled to unit standard deviation (constant columns become 0)."""
    centred = columns - columns.mean(axis=0)
    scale = centred.std(axis=0)
    return centred / np.where(scale > 1e-12, scale, 1.0)
