"""Step 8 of the audit: a mark found again by its look, in the pixels of the class's images.

A mark that moves between images (a badge anywhere, a logo that slides along an edge) gathers at no one place,
and where it lies inside the region that holds the objects' evidence, its map looks like an object's: the maps
alone miss such images (cues.py, steps 4 to 6). But a mark looks alike wherever it lies: the same pattern, up to
its brightness and contrast. Once the maps have found some of its images (the **seeds**), their pixels at the
mark's spot give its look, and every image of the class is searched for it:

1. **Crops.** Each seed's model input (the original under the eval transform's resize and centre crop), in grey,
   cropped at its mark's spot: the spot's ``w x w`` tokens and a token more on every side.
2. **The look.** Of the first ``REFERENCE_CANDIDATES`` seeds, the one whose spot the others match best (the largest
   median normalised cross-correlation, NCC, over the shifts within the margin) is the reference; every seed is
   aligned to it (its best shift) and standardised. The look is their pixelwise median, cut to the pixels that stand
   out from the field around the window (whose contrast with the mark changes from image to image), and its
   **mask** the pixels where the seeds agree (a robust spread under ``AGREEMENT``): the mark, without what differs
   from image to image.
3. **Search.** Each image of the class is scored by the best masked NCC of the look anywhere in it (where it
   matches gives its spot). The **null** is each seed's best score away from its mark's crop and from its best
   match: how well the look matches an image's other content.
4. **Verdict.** The threshold lies halfway between the null's ``NULL_QUANTILE`` and the seeds' median best match
   (the boundary between the two). The mark has a look of its own when at least ``MIN_SEED_MATCH`` of the seeds
   match above it (anywhere: the maps' spot of a mark that moves is a token or two off), and a sample of the other
   classes' images carries it less than ``MAX_OUTSIDE_RATIO`` times as often as the class's images (a mark the model
   uses gathers its images in its class; an edge or a texture the seeds happen to share is everywhere). Then the
   class's images that match it are the mark's images; otherwise (a mark whose look varies, too few seeds, common
   content, images that cannot be read) the maps' images stand.

The pixels are read through the run (``Run.image``); the step needs neither the model nor labels.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image
from scipy.signal import fftconvolve

from cdam_worker.audit.contact_sheet import input_box_in_image
from cdam_worker.audit.cues import Finding
from cdam_worker.audit.features import spot_width
from cdam_worker.reading import Run, RunError
from cdam_worker.shards.specs import DataError
from cdam_worker.storage import StorageError

MIN_SEEDS = 8
"""Seeds needed to learn a look (fewer: the maps' images stand)."""
MAX_SEEDS = 64
"""Seeds a look is learnt from, at most (the first in row order)."""
AGREEMENT = 0.5
"""A pixel belongs to the look where the aligned, standardised seeds' robust spread (1.4826 x their median absolute
deviation) is under this; a pixel stands out from the field when it differs from it by more than this."""
MIN_MASK_SHARE = 0.25
"""A look needs at least this share of its window's pixels agreeing."""
NULL_QUANTILE = 0.99
MIN_SEED_MATCH = 0.8
OUTSIDE_SAMPLE = 256
"""Other classes' images searched for the look, at most (a seeded sample)."""
MAX_OUTSIDE_RATIO = 0.5
"""A look is a mark's only when the share of other classes' images that carry it is under this fraction of the share
of the class's own: a mark the model uses gathers its images in its class, common content is everywhere."""
SEARCH_BATCH = 64
"""Images scored at once (their FFTs are held together)."""
REFERENCE_CANDIDATES = 8
"""Seeds tried as the reference the others are aligned to (the first in row order)."""
MIN_STD = 2.0 / 255.0
"""A window flatter than this (in grey levels of 0..1) matches nothing."""


@dataclass(frozen=True)
class Look:
    """A mark's look: a standardised ``template`` (0 off its ``mask``), the threshold its matches must exceed, and
    the share of the seeds that match it."""

    template: np.ndarray  # (K, K) float32
    mask: np.ndarray  # (K, K) bool
    threshold: float
    seed_match: float


@dataclass(frozen=True)
class LookSearch:
    """What step 8 found in a class: per image, whether it carries the mark and where; the look (None: not
    learnt, ``note`` says why)."""

    carries: np.ndarray  # (n,) bool
    spots: np.ndarray  # (n, 2) centre (y, x, grid fractions) of the best match
    look: Look | None
    note: str


def search_by_look(
    run: Run,
    keys: np.ndarray,
    seeds: np.ndarray,
    seed_spots: np.ndarray,
    grid: tuple[int, int],
    outside: np.ndarray,
) -> LookSearch:
    """Step 8 for the images ``keys`` of one class: ``seeds`` (bool, n) are the maps' images of its mark, at
    ``seed_spots`` (n, 2; grid fractions); ``outside`` the keys of a sample of other classes' images."""
    n = len(keys)
    none = LookSearch(np.zeros(n, dtype=bool), np.zeros((n, 2)), None, "")
    seed_index = np.flatnonzero(seeds)[:MAX_SEEDS]
    if len(seed_index) < MIN_SEEDS:
        return _without(none, f"{len(seed_index)} seed(s), fewer than {MIN_SEEDS}")
    views, readable = read_views(run, keys[seed_index], grid)
    if readable.sum() < MIN_SEEDS:
        return _without(none, f"only {int(readable.sum())} of the seeds' images could be read")
    height, width = views.shape[1:]
    token = (height / grid[0], width / grid[1])
    centres = seed_spots[seed_index][readable] * np.array([height, width])
    look = learn_look(views[readable], centres, spot_width(grid), token)
    if look is None:
        return _without(none, "the seeds' spots share no look")
    if look.seed_match < MIN_SEED_MATCH:
        return _without(none, f"{look.seed_match:.0%} of the seeds match the look, under {MIN_SEED_MATCH:.0%}")
    read = seed_index[readable]  # the seeds' images are scored from the views already read, the others read now
    rest = np.setdiff1d(np.arange(n), seed_index)
    scores, spots = np.full(n, np.nan), np.zeros((n, 2))
    scores[rest], spots[rest] = _search(run, keys[rest], grid, look)
    scores[read], where = match(views[readable], look)
    spots[read] = where / np.array([height, width])
    carries = np.nan_to_num(scores, nan=-np.inf) > look.threshold
    outside_scores = _search(run, outside, grid, look)[0]
    outside_share = float((np.nan_to_num(outside_scores, nan=-np.inf) > look.threshold).mean()) if len(outside) else 0.0
    if is_common_content(float(carries.mean()), outside_share):
        return _without(
            none,
            f"it is in {outside_share:.0%} of {len(outside)} other classes' images, against {carries.mean():.0%} of "
            "the class's: common content (an edge, a texture), not a mark",
        )
    unread = int(np.isnan(scores).sum())
    note = f"{int(carries.sum())} of {n} images carry it (masked NCC > {look.threshold:.2f}; "
    note += f"{look.seed_match:.0%} of the {len(seed_index)} seeds do, {outside_share:.0%} of {len(outside)} "
    note += "other classes' images)" + (f", {unread} not read" if unread else "")
    return LookSearch(carries, spots, look, note)


def is_common_content(class_share: float, outside_share: float) -> bool:
    """Whether a look the class's images carry at ``class_share`` is common content rather than a mark: the other
    classes' images carry it at ``outside_share``, at least ``MAX_OUTSIDE_RATIO`` of the class's share."""
    return outside_share >= MAX_OUTSIDE_RATIO * class_share


def _search(run: Run, keys: np.ndarray, grid: tuple[int, int], look: Look) -> tuple[np.ndarray, np.ndarray]:
    """The best masked NCC of ``look`` in each image of ``keys`` (NaN: not read) and where (grid fractions)."""
    scores, spots = np.full(len(keys), np.nan), np.zeros((len(keys), 2))
    for start in range(0, len(keys), SEARCH_BATCH):
        views, readable = read_views(run, keys[start : start + SEARCH_BATCH], grid)
        best, where = match(views[readable], look)
        at = start + np.flatnonzero(readable)
        scores[at] = best
        spots[at] = where / np.array(views.shape[1:])
    return scores, spots


def with_look(finding: Finding, search: LookSearch, spots: np.ndarray) -> Finding:
    """``finding`` with its mark's images replaced by those that carry the look (unchanged without a look);
    ``spots`` (n, 2) are the mark's spots the maps gave, replaced by the look's where it matched."""
    if search.look is None:
        return finding
    is_mark = search.carries
    kinds = np.where(finding.kinds == "mark", "", finding.kinds).astype(object)
    kinds[is_mark] = "mark"
    cue_share = float(is_mark.mean())
    return replace(
        finding,
        flagged=(finding.flagged & (finding.kinds != "mark")) | is_mark,
        kinds=kinds,
        cue_share=cue_share,
        score=max(cue_share, finding.tipping_excess),
        mark_spots=np.where(is_mark[:, None], search.spots, spots),
    )


def _without(none: LookSearch, why: str) -> LookSearch:
    return LookSearch(none.carries, none.spots, None, f"no look learnt: {why}")


def read_views(run: Run, keys: np.ndarray, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The model inputs of ``keys`` in grey (k, H, W) float32 in 0..1 (zeros where unreadable), and which were
    read."""
    config = run.attrs.get("data_config", {})
    _, height, width = config.get("input_size", run.attrs.get("input_size", [3, grid[0], grid[1]]))
    views = np.zeros((len(keys), int(height), int(width)), dtype=np.float32)
    readable = np.zeros(len(keys), dtype=bool)
    for i, key in enumerate(keys.tolist()):
        try:
            image = run.image(str(key))
        except (RunError, DataError, StorageError, OSError):  # a moved shard, an unreadable member: not searched
            continue
        box = input_box_in_image((0, 0, *grid), grid, image.size, run.attrs)
        view = image.convert("L").resize((int(width), int(height)), Image.Resampling.BILINEAR, box=box)
        views[i] = np.asarray(view, dtype=np.float32) / 255.0
        readable[i] = True
    return views, readable


def learn_look(views: np.ndarray, centres: np.ndarray, spot_tokens: int, token: tuple[float, float]) -> Look | None:
    """The look of the mark at ``centres`` (k, 2; pixels (y, x)) of the seeds' ``views`` (k, H, W); None when the
    aligned seeds agree on too few pixels (module docstring, steps 1, 2 and 4)."""
    margin = max(1, round(min(token)))
    side = min(round(spot_tokens * min(token)) + 2 * margin, *views.shape[1:])
    size = side - 2 * margin
    shape = np.array(views.shape[1:])
    spots = np.clip(np.round(centres - size / 2).astype(int), 0, shape - size)  # each seed's spot window
    origins = np.clip(spots - margin, 0, shape - side)  # and the crop around it
    crops = _windows(views, origins, side)  # (k, side, side)
    candidates = slice(0, REFERENCE_CANDIDATES)
    templates = _standardised(_windows(crops[candidates], (spots - origins)[candidates], size))
    ncc = _ncc(crops, templates, np.ones((size, size), dtype=bool))  # (k crops, candidates, shifts, shifts)
    best = ncc.reshape(len(crops), len(templates), -1).max(axis=2)
    reference = int(np.argmax(np.median(best, axis=0)))
    shifts = np.column_stack(np.unravel_index(ncc[:, reference].reshape(len(crops), -1).argmax(axis=1), ncc.shape[2:]))
    windows = _windows(crops, shifts, size)
    mean = windows.mean(axis=(1, 2), keepdims=True)
    std = np.maximum(windows.std(axis=(1, 2), keepdims=True), MIN_STD)
    steps = np.arange(side)[None, :]
    in_rows = (steps >= shifts[:, :1]) & (steps < shifts[:, :1] + size)  # (k, side)
    in_cols = (steps >= shifts[:, 1:]) & (steps < shifts[:, 1:] + size)
    outside = ~(in_rows[:, :, None] & in_cols[:, None, :])  # each crop's pixels around its aligned window
    field = float(np.median(((crops - mean) / std)[outside])) if outside.any() else None
    top, bottom, left, right = _mark_extent((np.median((windows - mean) / std, axis=0)), field)
    aligned = _standardised(windows[:, top:bottom, left:right])
    template = np.median(aligned, axis=0)
    spread = 1.4826 * np.median(np.abs(aligned - template), axis=0)  # robust to the seeds that are not the mark's
    mask = spread < AGREEMENT
    values = template[mask]
    if mask.mean() < MIN_MASK_SHARE or values.std() < 1e-3:  # no agreement, or a flat look (any plain surface)
        return None
    template = np.where(mask, (template - values.mean()) / values.std(), 0.0).astype(np.float32)
    partial = Look(template, mask, np.inf, 0.0)
    scores = _ncc_maps(views, partial)  # (k, H - ky + 1, W - kx + 1)
    null = _null(scores, origins + shifts + np.array([top, left]), side)
    if not len(null):
        return None
    matches = scores.reshape(len(scores), -1).max(axis=1)
    threshold = (float(np.quantile(null, NULL_QUANTILE)) + float(np.median(matches))) / 2
    return Look(template, mask, threshold, float((matches > threshold).mean()))


def match(views: np.ndarray, look: Look) -> tuple[np.ndarray, np.ndarray]:
    """Each view's best masked NCC with ``look`` and the centre (y, x, pixels) of that match."""
    if not len(views):
        return np.zeros(0), np.zeros((0, 2))
    scores = _ncc_maps(views, look)
    flat = scores.reshape(len(views), -1)
    where = flat.argmax(axis=1)
    y, x = np.unravel_index(where, scores.shape[1:])
    half_y, half_x = np.array(look.template.shape) / 2
    return flat[np.arange(len(views)), where], np.column_stack([y + half_y, x + half_x])


def _mark_extent(look: np.ndarray, field: float | None) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the pixels of a look (standardised) that stand out from the ``field`` around
    it (the median of the seeds' pixels just outside their window, in the same units) by more than ``AGREEMENT``:
    the mark without the surroundings, whose edge with the mark any object's edge would match. The whole look when
    there is no field or nothing stands out."""
    ys, xs = np.nonzero(np.abs(look - field) > AGREEMENT) if field is not None else ((), ())
    if not len(ys):
        return 0, look.shape[0], 0, look.shape[1]
    return int(min(ys)), int(max(ys)) + 1, int(min(xs)), int(max(xs)) + 1


def _windows(images: np.ndarray, origins: np.ndarray, side: int) -> np.ndarray:
    """(k, side, side) windows of ``images`` (k, H, W) at ``origins`` (k, 2: top, left), inside the images."""
    rows = origins[:, 0, None] + np.arange(side)[None, :]
    cols = origins[:, 1, None] + np.arange(side)[None, :]
    return images[np.arange(len(images))[:, None, None], rows[:, :, None], cols[:, None, :]]


def _standardised(patches: np.ndarray) -> np.ndarray:
    """Each patch at zero mean and unit standard deviation (a flat patch: zeros)."""
    mean = patches.mean(axis=(1, 2), keepdims=True)
    std = patches.std(axis=(1, 2), keepdims=True)
    return np.where(std > MIN_STD, (patches - mean) / np.maximum(std, MIN_STD), 0.0).astype(np.float32)


def _ncc(images: np.ndarray, templates: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(k images, t templates, positions y, positions x) masked NCC of standardised ``templates`` (zero off
    ``mask``) at every position of ``images`` (valid positions only), by FFT correlation."""
    x = images.astype(np.float64)[:, None]
    ones = mask.astype(np.float64)[::-1, ::-1][None, None]
    count = float(mask.sum())
    mean = fftconvolve(x, ones, mode="valid", axes=(2, 3)) / count
    variance = np.maximum(fftconvolve(x * x, ones, mode="valid", axes=(2, 3)) / count - mean * mean, 0.0)
    flipped = templates.astype(np.float64)[:, ::-1, ::-1][None]
    products = fftconvolve(x, flipped, mode="valid", axes=(2, 3))  # sum over the mask of x * template
    std = np.sqrt(variance)
    return np.where(std > MIN_STD, products / (count * np.maximum(std, MIN_STD)), 0.0)


def _ncc_maps(views: np.ndarray, look: Look) -> np.ndarray:
    """(k, positions y, positions x) masked NCC of the look over ``views``."""
    return _ncc(views, look.template[None], look.mask)[:, 0]


def _null(scores: np.ndarray, positions: np.ndarray, side: int) -> np.ndarray:
    """Per seed, its best score at least a crop's ``side`` away from ``positions`` (k, 2: where its aligned look
    lies) and from its best match: the look's best match in content other than the mark (an image holds one mark;
    a seed whose spot missed its mark keeps the mark out of the null). Seeds too small for such a place are left
    out."""
    k, py, px = scores.shape
    best = np.column_stack(np.unravel_index(scores.reshape(k, -1).argmax(axis=1), (py, px)))
    ys, xs = np.arange(py)[None, :, None], np.arange(px)[None, None, :]

    def away(centre: np.ndarray) -> np.ndarray:
        return (np.abs(ys - centre[:, 0, None, None]) >= side) | (np.abs(xs - centre[:, 1, None, None]) >= side)

    null = np.where(away(positions) & away(best), scores, -np.inf).reshape(k, -1).max(axis=1)
    return null[np.isfinite(null)]
