"""Confirm the audit's flagged clusters with the model: does it rely on the cue the maps point at?

Detection (features, scoring, clustering) reads only the maps; a cluster it flags is a hypothesis. This
module tests it with counterfactual images, edited in the model's input space (after the run's eval
transform; token ``(i, j)`` of the maps is the pixel box ``[i*ph, (i+1)*ph) x [j*pw, (j+1)*pw)``):

- the **region** of each of the cluster's images is where its evidence for the class lies. For a mark
  (and a label-disagreement cluster) it is the image's ``w x w`` spot as the audit gives it (``spot_width``; for a
  mark, where the mark lies: at its place, or where its look matches), grown by
  the neighbouring tokens that carry at least half the spot's mean share of the class's positive
  evidence (a mark larger than the spot). For a background cue it is every token whose positive evidence
  for the class is above the image's mean (the surroundings the maps point at); the rest is the object.
- **remove**: a mark's region is filled with the mean colour of the ring of tokens around it (the
  image's own surroundings: no new content, no sharp new edge inside the region); a background is
  swapped for the pixels of an image of another class at the same tokens. Measured on the cluster's
  images: the drop of the class's logit, beyond the drop of a **control** edit of the same size made
  elsewhere (for a mark, the same region moved to a place that does not overlap it where the maps see the
  least evidence for the class; for a background, the background swapped for another of the cluster's images',
  which carries the same cue), so that "any edit lowers the logit a little" is not taken for reliance; and the
  share of images whose top-1 leaves the class.
- **paste**: the region's pixels of a cluster image are put at the same place into random images of
  other classes (model top-1 not the class), except on the recipient's own object (where its own class's
  evidence lies: the cue is added, the recipient's evidence kept), and the flips to the class are counted, beside the
  flips when the control region is pasted instead (for a background: the same tokens from another recipient, a
  background swap without the cue).

Intervals are 95%: a percentile bootstrap (``RESAMPLES`` resamples of the images, seeded) for the mean
logit drop, and Wilson score intervals for the rates. A cluster is **relied on** when removing its
region lowers the logit beyond the control (the interval above 0, the mean at least ``RELIED_DROP_SHARE``
of the class's mean lead over the runner-up) or pasting it flips other classes' images (the rate at least
``MIN_FLIP_RATE``, its interval above the control's rate). A flagged cluster the model does not rely on
is unflagged by the pipeline (its detection score is kept).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from cdam_worker.audit.confirmation import Confirmation
from cdam_worker.audit.features import spot_width
from cdam_worker.shards.specs import DataError
from cdam_worker.evaluate.perturb import check_device, rows_per_pass
from cdam_worker.maps.model import LoadedModel
from cdam_worker.reading import Run, RunError
from cdam_worker.storage import StorageError

if TYPE_CHECKING:
    from cdam_worker.audit.pipeline import AuditResult

RESAMPLES = 2000
Z95 = 1.959964
GROW_SHARE = 0.5
"""A token next to a mark's spot joins the region when its evidence is at least this share of the spot's mean."""
CONTROL_CANDIDATES = 16
"""Random places tried per image for the moved control region (the one overlapping the region least is kept)."""


@dataclass(frozen=True)
class ConfirmSettings:
    """How many ``images`` of each flagged cluster and ``recipients`` of other classes are edited (seeded by
    ``seed``), on ``device``."""

    images: int = 64
    recipients: int = 64
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if min(self.images, self.recipients) < 2:
            raise RunError(f"--confirm-images {self.images}: at least 2 images are needed for an interval")
        check_device(self.device)


def wilson(successes: int, n: int) -> tuple[float, float, float]:
    """The rate ``successes / n`` with its Wilson score 95% interval (NaNs for n = 0)."""
    if n == 0:
        return (float("nan"),) * 3
    p = successes / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * np.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
    return p, max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_mean(
    values: np.ndarray, rng: np.random.Generator, resamples: int = RESAMPLES
) -> tuple[float, float, float]:
    """The mean of ``values`` with its percentile-bootstrap 95% interval (NaNs when empty)."""
    if len(values) == 0:
        return (float("nan"),) * 3
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return float(values.mean()), float(low), float(high)


# -- regions (token masks) ------------------------------------------------------------------------------


def positive_share(class_maps: np.ndarray) -> np.ndarray:
    """(n, gh, gw): each map's positive evidence as a share of its sum (uniform where it has none)."""
    positive = np.clip(class_maps.astype(np.float64), 0, None)
    total = positive.sum(axis=(1, 2), keepdims=True)
    return np.where(total > 0, positive / np.maximum(total, 1e-30), 1.0 / positive[0].size if len(positive) else 0.0)


def spot_regions(class_maps: np.ndarray, spot_y: np.ndarray, spot_x: np.ndarray) -> np.ndarray:
    """(n, gh, gw) bool: each image's spot (the ``w x w`` window centred at ``spot_y, spot_x``, fractions of the
    grid), grown by its neighbouring tokens with at least ``GROW_SHARE`` of the spot's mean evidence."""
    _, gh, gw = class_maps.shape
    width = spot_width((gh, gw))
    y0 = np.clip(np.rint(spot_y * gh - width / 2).astype(np.int64), 0, gh - width)
    x0 = np.clip(np.rint(spot_x * gw - width / 2).astype(np.int64), 0, gw - width)
    rows, cols = np.arange(gh), np.arange(gw)
    in_y = (rows[None] >= y0[:, None]) & (rows[None] < y0[:, None] + width)
    in_x = (cols[None] >= x0[:, None]) & (cols[None] < x0[:, None] + width)
    spot = in_y[:, :, None] & in_x[:, None, :]
    share = positive_share(class_maps)
    spot_mean = (share * spot).sum(axis=(1, 2)) / (width * width)
    ring = _dilate(spot) & ~spot
    return spot | (ring & (share >= GROW_SHARE * spot_mean[:, None, None]))


def evidence_regions(class_maps: np.ndarray) -> np.ndarray:
    """(n, gh, gw) bool: the tokens whose positive evidence for the map's class is above the image's mean."""
    positive = np.clip(class_maps, 0, None)
    return (positive > positive.mean(axis=(1, 2), keepdims=True)) & (positive > 0)


def moved_regions(regions: np.ndarray, rng: np.random.Generator, evidence: np.ndarray | None = None) -> np.ndarray:
    """The control of each region: the same shape moved (inside the grid) to the random place, of
    ``CONTROL_CANDIDATES`` tried, that overlaps it least and, among those, covers the least of ``evidence``
    ((n, gh, gw) shares of the class's evidence, e.g. ``positive_share``): a place where the maps see nothing."""
    n, gh, gw = regions.shape
    rows_any, cols_any = regions.any(axis=2), regions.any(axis=1)
    top, bottom = rows_any.argmax(axis=1), gh - 1 - rows_any[:, ::-1].argmax(axis=1)
    left, right = cols_any.argmax(axis=1), gw - 1 - cols_any[:, ::-1].argmax(axis=1)
    u = rng.random((2, n, CONTROL_CANDIDATES))
    dy = np.floor(-top[:, None] + u[0] * (gh - bottom + top)[:, None]).astype(np.int64)  # keeps the box in the grid
    dx = np.floor(-left[:, None] + u[1] * (gw - right + left)[:, None]).astype(np.int64)
    yy = np.arange(gh)[None, None, :, None] - dy[:, :, None, None]  # source row of each moved token
    xx = np.arange(gw)[None, None, None, :] - dx[:, :, None, None]
    inside = (yy >= 0) & (yy < gh) & (xx >= 0) & (xx < gw)
    image = np.arange(n)[:, None, None, None]
    moved = inside & regions[image, np.clip(yy, 0, gh - 1), np.clip(xx, 0, gw - 1)]  # (n, K, gh, gw)
    cost = (
        (moved & regions[:, None]).sum(axis=(2, 3)).astype(np.float64)
    )  # tokens overlapped, then the evidence covered (< 1)
    if evidence is not None:
        cost += (moved * evidence[:, None]).sum(axis=(2, 3)) / (1.0 + evidence.sum(axis=(1, 2)))[:, None]
    best = cost.argmin(axis=1)
    return moved[np.arange(n), best]


def _dilate(masks: np.ndarray) -> np.ndarray:
    """Each (gh, gw) mask grown by one token in the 8 directions."""
    tensor = torch.from_numpy(masks.astype(np.float32))[:, None]
    return F.max_pool2d(tensor, 3, stride=1, padding=1)[:, 0].numpy() > 0


# -- image edits (model input space) ----------------------------------------------------------------------


def pixel_masks(
    token_masks: np.ndarray, patch: tuple[int, int], size: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """(n, 1, H, W) bool: each token mask as pixel boxes of ``patch`` pixels (False past the token grid)."""
    masks = torch.from_numpy(token_masks).to(device)
    pixels = masks.repeat_interleave(patch[0], dim=1).repeat_interleave(patch[1], dim=2)[:, : size[0], : size[1]]
    return F.pad(pixels, (0, size[1] - pixels.shape[2], 0, size[0] - pixels.shape[1]))[:, None]


def fill_with_surroundings(images: torch.Tensor, regions: np.ndarray, patch: tuple[int, int]) -> torch.Tensor:
    """``images`` (n, 3, H, W) with each token region filled with the mean colour of the ring of tokens around it."""
    size = tuple(images.shape[2:])
    inside = pixel_masks(regions, patch, size, images.device)
    ring = pixel_masks(_dilate(regions) & ~regions, patch, size, images.device)
    ring = torch.where(ring.flatten(1).any(1)[:, None, None, None], ring, ~inside)  # a region without a ring: the rest
    mean = (images * ring).sum((2, 3), keepdim=True) / ring.sum((2, 3), keepdim=True).clamp(min=1)
    return torch.where(inside, mean, images)


def paste(images: torch.Tensor, donors: torch.Tensor, regions: np.ndarray, patch: tuple[int, int]) -> torch.Tensor:
    """``images`` with the pixels of ``donors`` (same shape) at each token region."""
    return torch.where(pixel_masks(regions, patch, tuple(images.shape[2:]), images.device), donors, images)


# -- one cluster ------------------------------------------------------------------------------------------


@dataclass
class ClusterImages:
    """The images one test needs: the cluster's (with their regions and controls) and the recipients'."""

    images: torch.Tensor  # (n, 3, H, W), model input space
    regions: np.ndarray  # (n, gh, gw) bool
    controls: np.ndarray | None  # (n, gh, gw) bool: a mark test's control regions (None for a background)
    recipients: torch.Tensor  # (m, 3, H, W)
    recipient_objects: np.ndarray  # (m, gh, gw) bool: where each recipient's own class's evidence lies


def counterfactual_tests(
    model: torch.nn.Module,
    class_index: int,
    kind: str,
    data: ClusterImages,
    patch: tuple[int, int],
    rng: np.random.Generator,
    batch: int,
) -> Confirmation:
    """Remove the region in the cluster's images and paste it into the recipients (at least one of each); measure as
    the module says. ``kind`` "background" swaps backgrounds; any other kind (a mark, a label-disagreement cluster) is
    tested as a mark."""
    n, m = len(data.images), len(data.recipients)
    background = kind == "background"
    pick = lambda count, size: torch.from_numpy(rng.integers(0, count, size=size)).to(data.images.device)
    if background:  # each image's background swapped for a recipient's (another class's); control: another of the
        # cluster's images' background, which carries the same cue (the swap itself, not the cue, is what it measures)
        removed = paste(data.images, data.recipients[pick(m, n)], data.regions, patch)
        controlled = paste(data.images, data.images[_others(n, rng, data.images.device)], data.regions, patch)
    else:
        removed, controlled = (
            fill_with_surroundings(data.images, data.regions, patch),
            fill_with_surroundings(data.images, data.controls, patch),
        )
    donor = pick(n, m)
    donors, chosen = data.images[donor], donor.cpu().numpy()
    keep = ~data.recipient_objects  # add the cue, keep their objects
    given = data.regions[chosen] & keep
    pasted = paste(data.recipients, donors, given, patch)
    if background:  # control: the same tokens from another recipient (a background swap without the cue)
        pasted_control = paste(data.recipients, data.recipients[_others(m, rng, data.images.device)], given, patch)
    else:
        pasted_control = paste(data.recipients, donors, data.controls[chosen] & keep, patch)
    original, edited, control = (_logits(model, x, batch) for x in (data.images, removed, controlled))
    lead = original[:, class_index] - original.scatter(1, torch.full((n, 1), class_index), -torch.inf).max(1).values
    drop = (control[:, class_index] - edited[:, class_index]).numpy().astype(np.float64)  # excess over the control edit
    top1 = [_logits(model, x, batch).argmax(1) for x in (data.recipients, pasted, pasted_control)]
    eligible = top1[0] != class_index
    flips = int((top1[1] == class_index)[eligible].sum())
    control_flips = int((top1[2] == class_index)[eligible].sum())
    n_paste = int(eligible.sum())
    return Confirmation(
        test="background" if background else "mark",
        n_removal=n,
        drop=bootstrap_mean(drop, rng),
        control_drop=float((original[:, class_index] - control[:, class_index]).mean()),
        top1_loss=wilson(int((edited.argmax(1) != class_index).sum()), n),
        n_paste=n_paste,
        flips=wilson(flips, n_paste),
        control_flips=control_flips / n_paste if n_paste else float("nan"),
        lead=float(lead.mean()),
    )


def _others(n: int, rng: np.random.Generator, device: torch.device) -> torch.Tensor:
    """For each of ``n`` images the index of another one, at random (itself only when ``n`` is 1)."""
    shift = rng.integers(1, n, size=n) if n > 1 else np.zeros(n, dtype=np.int64)
    return torch.from_numpy((np.arange(n) + shift) % n).to(device)


@torch.no_grad()
def _logits(model: torch.nn.Module, images: torch.Tensor, batch: int) -> torch.Tensor:
    """The model's logits of ``images`` (at least one), ``batch`` at a time, on the CPU."""
    return torch.cat([model(images[start : start + batch]).float().cpu() for start in range(0, len(images), batch)])


# -- the audit's flagged clusters -------------------------------------------------------------------------


def confirm_clusters(
    run: Run,
    result: AuditResult,
    model: LoadedModel,
    settings: ConfirmSettings,
    progress: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> tuple[dict[tuple[int, int], Confirmation], list[str]]:
    """Test every flagged cluster of ``result`` with ``model``: {(class, cluster): Confirmation}, and notes
    (images that could not be read). A cluster's ``kind`` (detection's: "mark", "background", "tipping"; "mark"
    when it has none) chooses the test. ``progress`` gets one line per cluster, with its time."""
    device = torch.device(settings.device)
    network = model.model.to(device).eval()
    patch = tuple(int(p) for p in run.attrs["patch_size"])
    gathered = result.gathered
    batch = rows_per_pass(network, run.grid[0] * run.grid[1] + network.num_prefix_tokens, device)
    flagged = [(audit, cluster) for audit in result.audited for cluster in audit.clusters if cluster.flagged]
    confirmations: dict[tuple[int, int], Confirmation] = {}
    notes: list[str] = []
    for number, (audit, cluster) in enumerate(flagged, start=1):
        started = time.perf_counter()
        rng = np.random.default_rng([settings.seed, audit.index, cluster.cluster])
        kind = getattr(cluster, "kind", "mark")
        members = audit.positions[audit.labels == cluster.cluster]
        members = np.sort(rng.choice(members, size=min(settings.images, len(members)), replace=False))
        others = gathered.in_row_order((gathered.classes != audit.index) & (gathered.labels != audit.index))
        others = others[np.sort(rng.choice(len(others), size=min(settings.recipients, len(others)), replace=False))]
        images, members = _read(run, model, gathered.keys, members, device, notes)
        if not len(members):
            notes.append(
                f"class {audit.name}, cluster {cluster.cluster}: none of its images could be read: not confirmed"
            )
            continue
        recipients, others = _read(run, model, gathered.keys, others, device, notes)
        if not len(others):
            notes.append(
                f"class {audit.name}, cluster {cluster.cluster}: no image of another class could be read: not confirmed"
            )
            continue
        maps = gathered.class_maps[members]
        if kind == "background":
            regions, controls = evidence_regions(maps), None
        else:
            spots = audit.spots[np.searchsorted(audit.positions, members)]  # a mark's spot: where the mark lies
            regions = spot_regions(maps, spots[:, 0], spots[:, 1])
            controls = moved_regions(regions, rng, positive_share(maps))
        data = ClusterImages(images, regions, controls, recipients, evidence_regions(gathered.class_maps[others]))
        confirmation = counterfactual_tests(network, audit.index, kind, data, patch, rng, batch)
        confirmation.seconds = time.perf_counter() - started
        confirmations[(audit.index, cluster.cluster)] = confirmation
        progress(
            f"confirming {number}/{len(flagged)}: class {audit.name}, cluster {cluster.cluster} "
            f"({confirmation.seconds:.1f} s): {confirmation.in_words()}"
        )
    return confirmations, notes


def _read(
    run: Run, model: LoadedModel, keys: np.ndarray, positions: np.ndarray, device: torch.device, notes: list[str]
) -> tuple[torch.Tensor, np.ndarray]:
    """The model inputs of the images at ``positions`` that can be read, and those positions."""
    tensors, readable = [], []
    for position in positions.tolist():
        try:
            tensors.append(model.transform(run.image(str(keys[position]))))
            readable.append(position)
        except (RunError, DataError, StorageError, OSError) as error:  # a moved shard, an unreadable member
            notes.append(f"image {keys[position]}: cannot be read ({error}): left out of the confirmation")
    if not tensors:
        return torch.zeros(0, 3, 1, 1, device=device), np.zeros(0, dtype=np.int64)
    return torch.stack(tensors).to(device), np.asarray(readable, dtype=np.int64)
