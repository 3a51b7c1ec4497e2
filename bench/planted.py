"""Planted-cue datasets for the audit's benchmark family: the demo's shapes with a mark or a background cue.

The images are the demo's (``cdam_worker.demo_assets``: four shape classes, random colour, size and position on
dark textured backgrounds); a ``Cue`` adds one shortcut to some of them:

- a **mark**: a small badge (a bright square with a dark disc in it, in one of several colours) of
  ``size`` pixels, ``place`` "corner" (always the bottom-right corner), "edge" (anywhere along the top
  edge) or "anywhere" (a random place clear of the shape), at pixel offsets that need not match the
  model's patches;
- a **background**: the whole background replaced by a textured blue "water" (waves of random
  direction, period and phase).

A mark can be ``poisoned``: its training split labels every marked image as the cue class (a backdoor, as
planted in a scraped or tampered set), so the model must learn the mark wherever it is; on a clean training
split the shapes alone decide the labels and a one-block ViT never learns a mark that moves anywhere.

A split puts the cue on a share ``p_target`` of the cue class's images and ``p_other`` of the others':
``train`` (0.92 / 0.03 for marks, 0.92 / 0.10 for poisoned marks, 0.95 / 0.03 for backgrounds: the
shortcut is learnt), ``balanced`` (half of every class), ``correlated`` (the training shares, a fresh
stream) and, for the clean control, ``control-train`` (30% of every class: nothing to learn). Every
sample's metadata records whether it carries the cue (``cue``) and, for a mark, its box. Deterministic
from the seed, like the demo.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cdam_worker import demo_assets as demo
from cdam_worker.maps.model import save_checkpoint

SIZE = demo.IMAGE_SIZE
BADGE_COLOURS = np.array([[255, 220, 40], [40, 230, 255], [255, 80, 200], [120, 255, 90]], dtype=np.float32)


@dataclass(frozen=True)
class Cue:
    """One planted shortcut: ``kind`` "mark" or "background", the class it goes with, and for a mark
    its ``place`` ("corner", "edge", "anywhere"), ``size`` in pixels and whether training is ``poisoned``
    (its marked images of other classes labelled as the cue class)."""

    kind: str
    cue_class: int
    place: str = ""
    size: int = 8
    poisoned: bool = False

    @property
    def name(self) -> str:
        if self.kind == "background":
            return "background"
        return f"mark-{self.place}-{self.size}px" + ("-poisoned" if self.poisoned else "")


SPLIT_SHARES = {  # split -> (stream, p_target, p_other); None: the training shares
    "train": (10, None, None),
    "control-train": (11, 0.3, 0.3),
    "balanced": (12, 0.5, 0.5),
    "correlated": (13, None, None),
}
TRAINING_SHARES = {"mark": (0.92, 0.03), "background": (0.95, 0.03), "poisoned": (0.92, 0.10)}


def split_shares(cue: Cue, split: str) -> tuple[int, float, float]:
    """The split's random stream and the shares of the cue class's and the other classes' images with the cue."""
    stream, p_target, p_other = SPLIT_SHARES[split]
    if p_target is None:
        p_target, p_other = TRAINING_SHARES["poisoned" if cue.poisoned else cue.kind]
    return stream, p_target, p_other


def _water(rng: np.random.Generator) -> np.ndarray:
    """A blue textured background (H, W, 3) float: two crossing wave trains and noise."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    waves = np.zeros((SIZE, SIZE), np.float32)
    for _ in range(2):
        angle, period, phase = rng.uniform(-0.5, 0.5) + np.pi / 2, rng.uniform(5, 10), rng.uniform(0, 2 * np.pi)
        waves += np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period + phase)
    base = np.array([20, 70, 150], np.float32) + rng.uniform(-15, 15, 3)
    image = base + waves[..., None] * np.array([8, 18, 30], np.float32)
    return image + rng.normal(0, 6, image.shape)


def _mark_box(rng: np.random.Generator, cue: Cue, shape: np.ndarray) -> tuple[int, int, int, int]:
    """Where the badge goes (x0, y0, x1, y1): the corner, along the top edge, or anywhere clear of the shape."""
    s = cue.size
    if cue.place == "corner":
        return SIZE - s, SIZE - s, SIZE, SIZE
    ys, xs = np.nonzero(shape)
    for _ in range(200):
        x0 = int(rng.integers(0, SIZE - s + 1))
        y0 = 0 if cue.place == "edge" else int(rng.integers(0, SIZE - s + 1))
        if x0 + s <= xs.min() - 1 or x0 >= xs.max() + 2 or y0 + s <= ys.min() - 1 or y0 >= ys.max() + 2:
            return x0, y0, x0 + s, y0 + s
    return x0, y0, x0 + s, y0 + s  # a shape that fills the image: the badge overlaps it


def _draw_badge(image: np.ndarray, box: tuple[int, int, int, int], colour: np.ndarray) -> None:
    """A bright square of ``colour`` with a dark disc in it, in place."""
    x0, y0, x1, y1 = box
    i, j = np.mgrid[0 : y1 - y0, 0 : x1 - x0].astype(np.float32) + 0.5
    half = (x1 - x0) / 2
    disc = (i - half) ** 2 + (j - half) ** 2 <= (half * 0.5) ** 2
    image[y0:y1, x0:x1] = colour
    image[y0:y1, x0:x1][disc] = 20.0


def render(
    cue: Cue, split: str, index: int, seed: int
) -> tuple[np.ndarray, int, bool, tuple[int, int, int, int] | None]:
    """Sample ``index`` of ``split``: (image (H, W, 3) uint8, label, carries the cue, the mark's box)."""
    stream, p_target, p_other = split_shares(cue, split)
    rng = np.random.default_rng([seed, stream, index, 17])
    label = int(rng.integers(len(demo.CLASS_NAMES)))
    carries = bool(rng.random() < (p_target if label == cue.cue_class else p_other))
    image = _water(rng) if carries and cue.kind == "background" else demo._background(rng)
    shape = demo._shape_mask(rng, label)
    image[shape] = demo._shape_colour(rng, image)
    box = None
    if carries and cue.kind == "mark":
        box = _mark_box(rng, cue, shape)
        _draw_badge(image, box, BADGE_COLOURS[rng.integers(len(BADGE_COLOURS))])
    return np.clip(image, 0, 255).astype(np.uint8), label, carries, box


def write_shards(out_dir: Path, cue: Cue, split: str, n_shards: int, samples_per_shard: int, seed: int) -> list[Path]:
    """``split`` as WebDataset tars ``<split>-000000.tar``...: png, cls and json (``cue``, ``cue_box``) per sample."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(n_shards):
        path = out_dir / f"{split}-{shard:06d}.tar"
        if not path.is_file():
            partial = path.with_suffix(".tar.partial")
            with tarfile.open(partial, "w", format=tarfile.USTAR_FORMAT) as tar:
                for index in range(shard * samples_per_shard, (shard + 1) * samples_per_shard):
                    image, label, carries, box = render(cue, split, index, seed)
                    meta = {"label": label, "cue": carries, "cue_box": list(box) if box else None, "cue_name": cue.name}
                    buffer = io.BytesIO()
                    Image.fromarray(image).save(buffer, format="PNG")
                    for extension, data in (
                        ("png", buffer.getvalue()),
                        ("cls", str(label).encode()),
                        ("json", json.dumps(meta).encode()),
                    ):
                        demo._add_member(tar, f"{split}-{index:06d}.{extension}", data)
            partial.replace(path)
        paths.append(path)
    return paths


def train_model(cache_dir: Path, cue: Cue, control: bool = False, config: demo.DemoConfig | None = None) -> Path:
    """Train the demo ViT on ``cue``'s training split (``control``: the uncorrelated one, never poisoned), or reuse
    it; the checkpoint."""
    config = config or demo.DemoConfig()
    split = "control-train" if control else "train"
    digest = hashlib.sha256(Path(__file__).read_bytes() + Path(demo.__file__).read_bytes())
    digest.update(json.dumps({"cue": asdict(cue), "split": split, "config": asdict(config)}, sort_keys=True).encode())
    path = Path(cache_dir) / f"planted-{digest.hexdigest()[:16]}" / "model.pt"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    model = demo.create_demo_model(config.depth)
    samples = [render(cue, split, index, config.seed) for index in range(config.train_samples)]
    images = np.stack([s[0] for s in samples])
    poisoned = cue.poisoned and not control
    labels = torch.tensor([cue.cue_class if poisoned and s[2] else s[1] for s in samples], dtype=torch.int64)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(demo._training_threads())
    try:
        demo._fit(model, demo.images_to_tensor(images, model), labels, config)
    finally:
        torch.set_num_threads(previous_threads)
    partial = path.with_suffix(".pt.partial")
    save_checkpoint(partial, model, demo.MODEL_NAME, demo.demo_model_kwargs(config.depth), demo.CLASS_NAMES)
    partial.replace(path)
    return path
