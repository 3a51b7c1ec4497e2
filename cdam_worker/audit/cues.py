"""Findings from the maps alone: which images of a class carry a cue at an unusual place, and of what kind.

A shortcut shows in CDAM as class evidence where the evidence of the *other* classes' images does not
lie: a watermark in a corner, a logo along an edge, a badge beside the object, the background around it.
The statistics are contrastive (this class against the other classes of the run) and scale-free (shares
of each image's evidence distribution ``P``, features.py), so they need no knowledge of the data:

1. **Usual region** of class c: the tokens where the *other* classes' mean evidence distribution (their
   images' ``P`` averaged, leave-class-out) is denser than evidence spread evenly (``1/N``). On objects
   photographed or drawn near the centre it is the middle of the frame; on data whose objects lie
   everywhere it covers much of the grid (and then little can lie off it).
2. **Off-place share** of an image: the share of its evidence on tokens outside its class's usual
   region (0: where everyone's evidence lies; 1: all of it elsewhere).
3. **Class test** (at least ``MIN_CUE_SHARE`` of the class estimated to carry the cue, step 4): the share ``f`` of the class's images whose off-place share exceeds the
   ``REFERENCE_QUANTILE`` (90th percentile) of the other classes' images' off-place shares, against the
   ``1 - REFERENCE_QUANTILE`` expected: a one-sided binomial test, Bonferroni-corrected over the audited
   classes at ``ALPHA``; ``excess = (f - 0.1) / 0.9`` (clipped to [0, 1]) is its effect size.
4. **Which images**: in a class whose test holds, the share ``pi`` of its images that carry the cue is
   estimated from how few of them lie low where the other classes' images lie: for each quantile ``q`` of
   ``SHARE_QUANTILES`` of the others' off-place share, at most ``F_class(x_q) / F_others(x_q)`` of the
   class can be like the others (the images that carry the cue lie above), so
   ``pi = max_q 1 - F_class(x_q) / F_others(x_q)`` (Storey's estimate of the null share, the other classes
   standing for the null). The ``round(pi * n)`` images with the largest off-place share are flagged;
   images of the class like the other classes' stay unflagged.
5. **Kind**: a *mark* when most of the flagged images' off-place evidence sits on one small spot (the
   median of "largest ``w x w`` window share / off-place share" is at least ``COMPACT``, 0.8), otherwise a
   *background/context* cue (evidence spread over the surroundings; a scene class looks like this too). A mark is
   also recognised pooled over the images (a fixed place: ``FIXED_PLACE_SHARE`` of their off-place evidence at one
   window). A background needs most of the flagged images' evidence off the usual region, a mark a good part of it
   (median shares at least ``MIN_OFF_PLACE``); an object that merely spills over it (a cross's arms) is no finding.
6. **At the mark's place**: for a mark, the images are found again by where it lies. Its region is the tokens where
   the flagged images' mean ``P`` is denser than the other classes' by more than ``1/N``; each image's share of its
   map's *absolute* attribution there (``|m| / sum(|m|)`` of its class map ``m``, either sign: a model can put negative evidence for the
   class on the very mark it relies on, and then ``P`` misses it) is compared with the other classes' images' shares
   at the same tokens, ``pi`` as in step 4, and the ``round(pi * n)`` images with the largest share are flagged. An
   image whose object holds most of its evidence but whose map also weighs the mark is found so. A mark that moves
   between images gathers at no one region: the images of step 4 that put a good part of their evidence off place
   (``MIN_OFF_PLACE``), on one spot elsewhere (compactness at least ``COMPACT``), stay flagged, at their own spot.
   When fewer than ``MIN_CUE_SHARE`` of the class weigh the place, the off-place evidence does not gather at one and
   nothing is flagged.
7. **A mark goes with its place**: a learnt mark speaks for the class in every image that carries it, also in the other
   classes' images, while a part of the class's own object (a triangle's base corner just off the other classes' usual
   region) does not travel. Of the other classes' images whose map weighs the mark's region at least as much as the
   flagged images' ``TRAVEL_WEIGHT_QUANTILE`` (lower quartile) but not for their own class (their own class's ``P``
   there no more than chance), the share in which the class's own stored map (``target_shares``: its ``P`` against the
   image's other stored maps) puts more there than chance (chance: the ``REFERENCE_QUANTILE`` of the other, third
   classes' ``P`` there) must not lie significantly below ``TRAVEL_SHARE`` (one-sided binomial, Bonferroni, ``ALPHA``);
   else nothing is flagged. Without other stored maps (``--targets`` without the class), or with few such images
   (the training correlation: few other images carry the mark), it cannot be told and the mark is kept.

Label disagreement is one more finding (``tipping``): the share of the class's labelled images labelled
as another class, tested the same way against the run's pooled share of such images in the other
classes (binomial, Bonferroni, at least ``TIPPING_RATIO`` times the usual), and only when the maps show a cue
tipped them: more of those images than the ``1 - REFERENCE_QUANTILE`` expected put their evidence off place beyond
the other classes' ``REFERENCE_QUANTILE`` (the step-3 test on them). A clean model's ordinary confusions (near the
usual share, or two similar classes confused with the evidence where everyone's lies) are not flagged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import binom

from cdam_worker.audit.features import spot_width, window_sums
from cdam_worker.audit.spill import release

REFERENCE_QUANTILE = 0.9
SHARE_QUANTILES = (0.25, 0.5, 0.75, 0.9)
MIN_CUE_SHARE = 0.2
"""A place finding needs at least this estimated share of the class carrying the cue: an object part that
lies off the other classes' usual region (a triangle's tip) moves a few images, not a fifth of the class."""
ALPHA = 0.01
TIPPING_RATIO = 3.0
COMPACT = 0.8
FIXED_PLACE_SHARE = 0.6
"""Pooled over the flagged images, a fixed mark holds at least this share of their off-place evidence at one spot
window (measured: the demo's corner watermark 0.80; water backgrounds 0.12-0.13; a cross's arms 0.32)."""
MIN_OFF_PLACE = {"background": 0.5, "mark": 0.3}
"""A place finding needs its flagged images to put this much of their evidence (median share) off the other classes'
usual region. A background: most of it (the evidence lies on the surroundings *rather than* on the object). A mark:
a good part of it (measured: learnt marks 0.47 to 0.77 in the benchmark family and the demo; a cross whose arms spill
onto a spot off that region, in a model that learnt no mark, 0.20). An object less compact than the others' spills a
little evidence off that region in many images; that is no cue."""
TRAVEL_WEIGHT_QUANTILE = 0.25
"""Step 7 judges the other classes' images whose map weighs the mark's place at least as much as this quantile of the
flagged images' maps do: those likely to show what the flagged images show there. With the training correlation the
other classes' images that carry a learnt mark are mostly tipped into the class, and those left that weigh the place
only a little do so for other reasons (measured: the 10th percentile judged 46 such images of a learnt edge logo, 6
followed, and the mark was dropped; the lower quartile judges 5, 3 follow, kept; the clean controls' object parts are
still dropped, p x tests 0.006 and 2e-9)."""
TRAVEL_SHARE = 0.5
"""A mark's evidence goes with it into at least this share of the other classes' images that weigh its place but not
for their own class (measured: learnt marks 0.9 to 1.0 in balanced splits; an object part of a clean control 0.06 to
0.23); step 7 drops a mark whose share is significantly below it."""
KINDS = ("mark", "background", "tipping")
PLACE_STEP = 4096
"""Images whose place statistics are computed at a time."""
KIND_WORDS = {
    "mark": "a mark at a place",
    "background": "a background/context cue (or a scene class)",
    "tipping": "a cue that tips other classes' images over",
}


@dataclass
class PlaceStatistics:
    """Per image (aligned with the gathered images): its off-place share and how compact that evidence is, and what the
    attribution at a mark's place is read from (step 6)."""

    off_place: np.ndarray  # (n,) share of the image's evidence outside its class's usual region
    compactness: np.ndarray  # (n,) largest spot window of the off-place evidence / off-place share
    off_spot: np.ndarray  # (n, 2) centre (y, x, grid fractions) of that window: where a mark lies
    usual: np.ndarray  # (C, gh, gw) bool: each class's usual region (all True for classes not audited)
    share: np.ndarray  # (n, gh, gw) each image's evidence distribution ``P`` (the features' own array, not a copy)
    class_maps: np.ndarray  # (n, gh, gw) each image's signed map ``m`` of its class (the gathered array, not a copy)
    mass: np.ndarray  # (n,) ``sum(|m|)``: an image's attribution of either sign at tokens T is ``sum_T |m| / mass``
    target_classes: np.ndarray | None = None  # (n, T) the classes of each image's stored maps (-1: none); None: unknown
    target_shares: np.ndarray | None = None  # (n, T, gh, gw) their evidence distributions (gather.py, not a copy)

    def attribution(self, index: np.ndarray, region: np.ndarray) -> np.ndarray:
        """(len(index), N) float64 ``|m| / sum(|m|)`` of the images ``index`` on the tokens of ``region`` (N bool),
        0 elsewhere (uniform for an all-zero map)."""
        flat = self.class_maps.reshape(len(self.class_maps), -1)
        absolute = np.abs(flat[index].astype(np.float64))
        mass = self.mass[index][:, None]
        return np.where(mass > 0, absolute / np.maximum(mass, 1e-30), 1.0 / flat.shape[1]) * region

    def attribution_sums(self, index: np.ndarray, region: np.ndarray) -> np.ndarray:
        """(len(index),) the images' share of attribution on ``region``, ``PLACE_STEP`` images at a time."""
        sums = np.zeros(len(index))
        for start in range(0, len(index), PLACE_STEP):
            sums[start : start + PLACE_STEP] = self.attribution(index[start : start + PLACE_STEP], region).sum(axis=1)
            release(self.class_maps)
        return sums

    def mean_share(self, index: np.ndarray) -> np.ndarray:
        """(N,) float64 the mean evidence distribution ``P`` of the images ``index``, ``PLACE_STEP`` images at a time."""
        n_tokens = self.share[0].size
        total = np.zeros(n_tokens)
        for start in range(0, len(index), PLACE_STEP):
            total += self.share[index[start : start + PLACE_STEP]].reshape(-1, n_tokens).sum(axis=0, dtype=np.float64)
            release(self.share)
        return total / max(len(index), 1)


@dataclass
class Finding:
    """What the maps say about one class: its place score, test, flagged images and their kind."""

    score: float  # the larger of the place and tipping effect sizes, 0 to 1
    place_excess: float
    cue_share: float  # pi: the estimated share of the class's images that carry the cue (0 when the test fails)
    place_p: float
    tipping_excess: float
    tipping_p: float
    flagged: np.ndarray  # (n_class,) bool: images carrying the cue (place) or tipped over (tipping)
    kinds: np.ndarray  # (n_class,) str: the kind of each flagged image, "" for the others
    mark_spots: np.ndarray | None = None  # (n_class, 2) for a mark: each image's spot at the mark's place (step 6)


def place_statistics(
    share: np.ndarray,
    class_maps: np.ndarray,
    classes: np.ndarray,
    n_classes: int,
    target_classes: np.ndarray | None = None,
    target_shares: np.ndarray | None = None,
) -> PlaceStatistics:
    """Off-place share and compactness of every image, against its class's usual region (leave-class-out).

    ``share`` is (n, gh, gw), each image's evidence distribution; ``class_maps`` (n, gh, gw) its signed map of its
    audited class (kept by reference, for the attribution at a mark's place); ``target_classes`` and ``target_shares``
    every stored map's class and evidence distribution (kept by reference, for step 7); ``classes`` (n,) its audited class (-1:
    counts for the others' usual regions of nobody; left out). Computed ``PLACE_STEP`` images at a time, so its
    memory beyond ``share`` is bounded (the per-class sums add each class's images in order, one by one)."""
    n, gh, gw = share.shape
    kept = classes >= 0
    group = np.where(kept, classes, n_classes)
    sums = np.zeros((n_classes + 1, gh * gw))  # (C + 1, N) per-class sums
    for start in range(0, n, PLACE_STEP):
        part = slice(start, start + PLACE_STEP)
        np.add.at(sums, group[part], share[part].reshape(-1, gh * gw).astype(np.float64))
        release(share)
    counts = np.bincount(group, minlength=n_classes + 1)[:n_classes]
    total, total_count = sums[:n_classes].sum(axis=0), counts.sum()
    others = (total[None, :] - sums[:n_classes]) / np.maximum(total_count - counts, 1)[:, None]  # (C, N)
    usual = others * (gh * gw) >= 1.0  # denser than evidence spread evenly
    usual[(total_count - counts) == 0] = True
    off_place, compactness, off_spot = np.zeros(n), np.zeros(n), np.zeros((n, 2))
    mass = np.zeros(n)
    width = spot_width((gh, gw))
    for start in range(0, n, PLACE_STEP):
        part = slice(start, start + PLACE_STEP)
        flat = share[part].reshape(-1, gh * gw).astype(np.float64)
        m = len(flat)
        outside = ~usual[np.clip(classes[part], 0, n_classes - 1)]  # (m, N)
        off = np.where(outside, flat, 0.0)
        off_place[part] = off.sum(axis=1)
        windows = window_sums(off.reshape(m, gh, gw), width).reshape(m, -1)
        best = windows.argmax(axis=1)
        wy, wx = np.unravel_index(best, (gh - width + 1, gw - width + 1))
        compactness[part] = np.where(
            off_place[part] > 0, windows[np.arange(m), best] / np.maximum(off_place[part], 1e-30), 0.0
        )
        off_spot[part] = np.column_stack([(wy + width / 2) / gh, (wx + width / 2) / gw])
        mass[part] = np.abs(class_maps[part].astype(np.float64)).sum(axis=(1, 2))
        release(share, class_maps)
    return PlaceStatistics(
        off_place=np.where(kept, off_place, 0.0),
        compactness=compactness,
        off_spot=off_spot,
        usual=usual.reshape(n_classes, gh, gw),
        share=share,
        class_maps=class_maps,
        mass=mass,
        target_classes=target_classes,
        target_shares=target_shares,
    )


def find(
    positions: np.ndarray,
    classes: np.ndarray,
    stats: PlaceStatistics,
    n_tests: int,
    other_labelled: np.ndarray | None,
    usual_other: float,
    labelled: int,
) -> Finding:
    """The finding of the class made of ``positions`` (indices into the gathered images; ``classes`` their
    audited class, -1 for images not audited), tested against the other classes' images.

    ``other_labelled``: per image of the class, whether it is labelled as another class (None: no labels, or
    ``--by label``), of its ``labelled`` images with a label; ``usual_other``: the other classes' pooled
    share of such images; ``n_tests``: the number of audited classes (the Bonferroni factor)."""
    n = len(positions)
    mine = stats.off_place[positions]
    own = classes[positions].max()  # -1: none of the class's images has a competitor map
    reference = stats.off_place[(classes >= 0) & (classes != own)] if own >= 0 else np.zeros(0)
    flagged = np.zeros(n, dtype=bool)
    kinds = np.full(n, "", dtype=object)
    mark_spots = None
    place_p, place_excess, cue_share = 1.0, 0.0, 0.0
    if len(reference):
        above = int((mine > np.quantile(reference, REFERENCE_QUANTILE)).sum())
        expected = 1.0 - REFERENCE_QUANTILE
        place_p = _off_place_test(mine, reference)
        place_excess = float(np.clip((above / n - expected) / (1 - expected), 0.0, 1.0))
    if place_p * n_tests < ALPHA:
        cue_share = carrying_share(mine, reference)
        cue_share = cue_share if cue_share >= MIN_CUE_SHARE else 0.0
        flagged[np.argsort(-mine, kind="stable")[: round(cue_share * n)]] = True
        kind = _place_kind(stats, positions[flagged])
        if kind and np.median(mine[flagged]) < MIN_OFF_PLACE[kind]:
            kind, cue_share = "", 0.0
            flagged[:] = False
        if kind == "mark":
            flagged, cue_share, mark_spots = _at_the_mark(stats, positions, classes, own, flagged, cue_share, n_tests)
        kinds[flagged] = kind

    tipping_p, tipping_excess = 1.0, 0.0
    if other_labelled is not None and labelled:
        wrong = int(other_labelled.sum())
        usual = max(usual_other, 1.0 / max(labelled, 1))  # no confusions elsewhere: one in the class is the usual
        tipping_p = float(binom.sf(wrong - 1, labelled, usual)) if wrong else 1.0
        tipping_excess = float(np.clip((wrong / labelled - usual) / max(1 - usual, 1e-12), 0.0, 1.0))
        if (
            tipping_p * n_tests < ALPHA
            and wrong / labelled >= TIPPING_RATIO * usual
            and _off_place_test(mine[other_labelled], reference) * n_tests < ALPHA
        ):
            kinds[other_labelled & ~flagged] = "tipping"
            flagged = flagged | other_labelled
        else:
            tipping_excess = 0.0  # ordinary confusions are no finding
    return Finding(
        score=max(cue_share, tipping_excess),
        place_excess=place_excess,
        cue_share=cue_share,
        place_p=place_p,
        tipping_excess=tipping_excess,
        tipping_p=tipping_p,
        flagged=flagged,
        kinds=kinds,
        mark_spots=mark_spots,
    )


def _off_place_test(values: np.ndarray, reference: np.ndarray) -> float:
    """One-sided binomial p-value that more of ``values`` (off-place shares) than the ``1 - REFERENCE_QUANTILE``
    expected exceed the ``REFERENCE_QUANTILE`` of ``reference``; 0 without a reference (no competitor maps: the labels
    speak alone), 1 without values."""
    if not len(reference):
        return 0.0
    above = int((values > np.quantile(reference, REFERENCE_QUANTILE)).sum())
    return float(binom.sf(above - 1, len(values), 1.0 - REFERENCE_QUANTILE)) if above else 1.0


def _at_the_mark(
    stats: PlaceStatistics,
    positions: np.ndarray,
    classes: np.ndarray,
    own: int,
    flagged: np.ndarray,
    cue_share: float,
    n_tests: int,
) -> tuple[np.ndarray, float, np.ndarray | None]:
    """The images of a class with a mark, found again by the attribution at the mark's place (step 6): the flagged
    images, the new ``pi`` and each image's spot there, (n, 2) centres (y, x, grid fractions) of its ``w x w`` window
    with the most attribution inside the region, or of its off-place spot for an image of step 4 whose mark lies
    elsewhere (None: ``flagged`` kept).

    The region: the tokens where the flagged images' mean ``P`` is denser than the other classes' by more than ``1/N``.
    Each image's share of its absolute attribution there is compared with the other classes' images' shares at the
    same tokens (``carrying_share``), and the ``round(pi * n)`` images with the largest share (some of it there) are
    flagged, with those of ``flagged`` that put a good part of their evidence (``MIN_OFF_PLACE``) compactly on one
    spot elsewhere (a mark that moves). Keeps ``flagged`` when the region is empty; flags nothing when ``pi`` is under
    ``MIN_CUE_SHARE`` or when the class's evidence does not go with the place into the other classes' images
    (``_follows_the_place``)."""
    n, n_tokens = len(positions), stats.share[0].size
    others = (classes >= 0) & (classes != own)
    flagged_mean = stats.share[positions[flagged]].reshape(-1, n_tokens).mean(axis=0, dtype=np.float64)
    denser = flagged_mean - stats.mean_share(np.flatnonzero(others))
    region = denser * n_tokens > 1.0
    if not region.any():
        return flagged, cue_share, None
    attribution = stats.attribution(positions, region)  # (n, N): the class's images' attribution inside the region
    at_mark = attribution.sum(axis=1)
    share = carrying_share(at_mark, stats.attribution_sums(np.flatnonzero(others), region))
    if share < MIN_CUE_SHARE:
        return np.zeros_like(flagged), 0.0, None
    again = np.zeros(n, dtype=bool)
    again[np.argsort(-at_mark, kind="stable")[: round(share * n)]] = True
    again &= at_mark > 0
    if again.any() and not _follows_the_place(stats, classes, own, region, at_mark[again], n_tests):
        return np.zeros_like(flagged), 0.0, None
    gh, gw = stats.share.shape[1:]
    width = spot_width((gh, gw))
    windows = window_sums(attribution.reshape(n, gh, gw), width).reshape(n, -1)
    wy, wx = np.unravel_index(windows.argmax(axis=1), (gh - width + 1, gw - width + 1))
    spots = np.column_stack([(wy + width / 2) / gh, (wx + width / 2) / gw])
    spotted = (stats.off_place[positions] >= MIN_OFF_PLACE["mark"]) & (stats.compactness[positions] >= COMPACT)
    elsewhere = flagged & ~again & spotted  # the mark at another place
    spots[elsewhere] = stats.off_spot[positions[elsewhere]]
    return again | elsewhere, max(share, float((again | elsewhere).mean())), spots


def _follows_the_place(
    stats: PlaceStatistics, classes: np.ndarray, own: int, region: np.ndarray, weights: np.ndarray, n_tests: int
) -> bool:
    """Whether the class's evidence goes with its mark's place into the other classes' images (step 7): False when
    enough of those that weigh the place (``weights``: the flagged images' attribution there) but not for their own
    class put no more of the class's evidence there than chance; True when that cannot be told (no other stored maps)."""
    if stats.target_classes is None or stats.target_shares is None or not stats.target_classes.size:
        return True
    others = np.flatnonzero((classes >= 0) & (classes != own))
    at_place = _shares_at(stats.target_shares, others, region)  # (k, T)
    targets = stats.target_classes[others]
    is_class, is_own = targets == own, targets == classes[others][:, None]
    rest = (targets >= 0) & ~is_class & ~is_own
    if not rest.any():
        return True
    chance = np.quantile(at_place[rest], REFERENCE_QUANTILE)
    weighing = stats.attribution_sums(others, region) >= np.quantile(weights, TRAVEL_WEIGHT_QUANTILE)
    not_their_own = (at_place * is_own).sum(axis=1) <= chance
    judged = weighing & not_their_own & is_class.any(axis=1)
    follows = int(((at_place * is_class).sum(axis=1)[judged] > chance).sum())
    return float(binom.cdf(follows, int(judged.sum()), TRAVEL_SHARE)) * n_tests >= ALPHA


def _shares_at(target_shares: np.ndarray, index: np.ndarray, region: np.ndarray) -> np.ndarray:
    """(len(index), T) float64 each stored map's share of its evidence on ``region`` (N bool) in the images ``index``,
    ``PLACE_STEP`` images at a time."""
    n, slots = target_shares.shape[:2]
    flat = target_shares.reshape(n, slots, -1)
    at = np.zeros((len(index), slots))
    for start in range(0, len(index), PLACE_STEP):
        at[start : start + PLACE_STEP] = flat[index[start : start + PLACE_STEP]][:, :, region].sum(
            axis=2, dtype=np.float64
        )
        release(target_shares)
    return at


def _place_kind(stats: PlaceStatistics, flagged: np.ndarray) -> str:
    """ "mark" when the flagged images' off-place evidence sits on one spot: in most images (median compactness at
    least ``COMPACT``) or pooled over them (a fixed place: the evidence in their spot windows at the most loaded window
    position holds ``FIXED_PLACE_SHARE`` of their off-place evidence); else "background"; "" when nothing is flagged."""
    if not len(flagged):
        return ""
    if np.median(stats.compactness[flagged]) >= COMPACT:
        return "mark"
    in_window = stats.off_place[flagged] * stats.compactness[flagged]
    _, where = np.unique(np.round(stats.off_spot[flagged], 6), axis=0, return_inverse=True)
    pooled = np.bincount(where.ravel(), weights=in_window).max() / max(stats.off_place[flagged].sum(), 1e-30)
    return "mark" if pooled >= FIXED_PLACE_SHARE else "background"


def carrying_share(values: np.ndarray, reference: np.ndarray) -> float:
    """``pi = max_q 1 - F_values(x_q) / F_reference(x_q)`` over the ``SHARE_QUANTILES`` ``x_q`` of ``reference``,
    clipped to [0, 1]: the share of ``values`` that cannot be like the reference (module docstring, step 4)."""
    cuts = np.quantile(reference, SHARE_QUANTILES)
    mine_below = np.searchsorted(np.sort(values), cuts, side="right") / len(values)
    others_below = np.searchsorted(np.sort(reference), cuts, side="right") / len(reference)
    return float(np.clip(np.max(1.0 - mine_below / np.maximum(others_below, 1e-12)), 0.0, 1.0))
