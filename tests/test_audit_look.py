"""Step 8 of the audit (cdam_worker/audit/appearance.py): a mark's look learnt from the seeds the maps found, at
imprecise spots, finds the other images that carry it; seeds that share no look give none."""

from __future__ import annotations

import numpy as np

from cdam_worker.audit.appearance import MIN_SEED_MATCH, is_common_content, learn_look, match

SIZE, TOKEN, SPOT_TOKENS, BADGE = 64, 8, 2, 12


def _image(rng: np.random.Generator) -> np.ndarray:
    """A grey image: a random level with noise and a bright or dark disc (the object) somewhere."""
    image = rng.uniform(0.2, 0.8) + rng.normal(0.0, 0.03, (SIZE, SIZE))
    y, x = rng.integers(12, SIZE - 12, 2)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    image[(yy - y) ** 2 + (xx - x) ** 2 <= rng.integers(6, 12) ** 2] = rng.uniform(0.0, 1.0)
    return image


def _badge(image: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    """A square of random brightness with a dark disc in it, at a random place; its centre (y, x)."""
    y, x = rng.integers(0, SIZE - BADGE, 2)
    yy, xx = np.mgrid[:BADGE, :BADGE] + 0.5
    patch = np.full((BADGE, BADGE), rng.uniform(0.6, 1.0))
    patch[(yy - BADGE / 2) ** 2 + (xx - BADGE / 2) ** 2 <= (BADGE / 4) ** 2] = 0.05
    image[y : y + BADGE, x : x + BADGE] = patch
    return y + BADGE // 2, x + BADGE // 2


def _views(n: int, marked: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    views = np.stack([_image(rng) for _ in range(n)]).astype(np.float32)
    centres = np.array([_badge(view, rng) if m else (0, 0) for view, m in zip(views, marked)], dtype=float)
    return np.clip(views, 0.0, 1.0), centres


def test_a_look_learnt_at_imprecise_spots_finds_the_images_that_carry_the_mark():
    marked = np.arange(120) % 3 != 0  # 80 of 120 carry the badge
    views, centres = _views(120, marked, seed=0)
    seeds = np.flatnonzero(marked)[:24]
    spots = centres[seeds] + np.random.default_rng(1).integers(-6, 7, (len(seeds), 2))  # the maps' spot is off
    look = learn_look(views[seeds], spots, SPOT_TOKENS, (TOKEN, TOKEN))
    assert look is not None and look.seed_match >= MIN_SEED_MATCH
    scores, where = match(views, look)
    found = scores > look.threshold
    assert (found & marked).sum() / found.sum() >= 0.95  # precision
    assert (found & marked).sum() / marked.sum() >= 0.95  # recall
    assert np.abs(where[found & marked] - centres[found & marked]).max() <= 2  # where it lies, to a pixel or two


def test_seeds_that_share_no_look_give_none():
    views, _ = _views(40, np.zeros(40, dtype=bool), seed=2)  # no badge anywhere: spots on random content
    spots = np.random.default_rng(3).uniform(8, SIZE - 8, (24, 2))
    look = learn_look(views[:24], spots, SPOT_TOKENS, (TOKEN, TOKEN))
    assert look is None or look.seed_match < MIN_SEED_MATCH


def test_a_look_that_other_classes_images_carry_as_often_is_common_content_not_a_mark():
    # the same badge in every image of every class: the seeds share its look, but so does every other image
    views, centres = _views(24, np.ones(24, dtype=bool), seed=4)
    look = learn_look(views, centres, SPOT_TOKENS, (TOKEN, TOKEN))
    assert look is not None and look.seed_match >= MIN_SEED_MATCH
    class_share = float((match(views, look)[0] > look.threshold).mean())
    outside, _ = _views(64, np.ones(64, dtype=bool), seed=5)
    outside_share = float((match(outside, look)[0] > look.threshold).mean())
    assert class_share > 0.9 and is_common_content(class_share, outside_share)
    assert not is_common_content(0.9, 0.3)  # a mark's look that few other images carry is not
