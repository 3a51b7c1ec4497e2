"""The built-in offline demo: a synthetic shapes dataset with a planted watermark, and a tiny ViT trained on it.

Four shape classes (circle, square, triangle, cross) are drawn with random bright colour, size and
position on random dark textured backgrounds (blotchy noise or stripes). The watermarked class carries a small bright "x" in the bottom-right patch
in most of its training images (and a few images of the other classes do too), so the model learns the
watermark as a shortcut. In the "test" split every image of every class carries the watermark: a
faithful CDAM of the watermarked class lights up that patch.

Everything is deterministic from a seed: sample ``i`` of a split is rendered from its own random stream,
so shards and in-memory arrays hold the same images. Training keeps the CLS token from changing before the
last block (see ``_class_token_drift_hook``) so that the last attention layer, which CDAM differentiates,
is where the model reads the image. The trained model is cached under a key that
hashes the generator and training settings and this module's source.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import timm
import torch
from PIL import Image
from timm.data import resolve_model_data_config

from cdam_worker.maps.model import save_checkpoint

CLASS_NAMES = ["circle", "square", "triangle", "cross"]
IMAGE_SIZE = 64
PATCH_SIZE = 8
WATERMARK_CLASS = 0
POSITION_JITTER = 8.0  # px: shapes sit near the centre, so a tiny ViT learns them in a minute
WATERMARK_BOX = (IMAGE_SIZE - PATCH_SIZE, IMAGE_SIZE - PATCH_SIZE, IMAGE_SIZE, IMAGE_SIZE)  # x0, y0, x1, y1

MODEL_NAME = "vit_tiny_patch16_224"
MODEL_KWARGS: dict[str, Any] = {
    "img_size": IMAGE_SIZE,
    "patch_size": PATCH_SIZE,
    "embed_dim": 96,
    "depth": 3,
    "num_heads": 3,
    "num_classes": len(CLASS_NAMES),
    "global_pool": "token",
    # crop_pct 1.0: the eval transform keeps the whole 64 px image, so the corner watermark survives.
    "pretrained_cfg_overlay": {"crop_pct": 1.0},
}


@dataclass(frozen=True)
class SplitSpec:
    """How a split is drawn: its random stream, the watermark probability per kind of class, and where
    the watermark goes: "corner" (always the bottom-right patch) or "moving" (a random patch clear of
    the shape)."""

    stream: int
    p_watermark_target: float
    p_watermark_other: float
    mark: str = "corner"


# "test" and "clean" share a stream: the same images, with the watermark on half of them or on none.
SPLITS = {
    "train": SplitSpec(stream=0, p_watermark_target=0.95, p_watermark_other=0.05),
    "test": SplitSpec(stream=1, p_watermark_target=0.5, p_watermark_other=0.5),
    "clean": SplitSpec(stream=1, p_watermark_target=0.0, p_watermark_other=0.0),
    # The moving-mark variant (the audit's injection test): half of the target class's training images
    # carry the mark on a random patch, and so do 30% of the others, which training then labels as the
    # target class (``DemoConfig.relabel_marked``, a backdoor); "moving-test" marks 30% of every class
    # (true labels), "moving-clean" is its unmarked twin.
    "moving-train": SplitSpec(stream=2, p_watermark_target=0.5, p_watermark_other=0.3, mark="moving"),
    "moving-test": SplitSpec(stream=3, p_watermark_target=0.3, p_watermark_other=0.3, mark="moving"),
    "moving-clean": SplitSpec(stream=3, p_watermark_target=0.0, p_watermark_other=0.0, mark="moving"),
}


@dataclass(frozen=True)
class DemoConfig:
    """Every setting that determines the demo's data and model (hashed into the cache key)."""

    seed: int = 0
    train_split: str = "train"
    relabel_marked: bool = False  # train on every marked image as the watermark class (a backdoor)
    depth: int = MODEL_KWARGS["depth"]  # transformer blocks of the ViT
    train_samples: int = 4096
    epochs: int = 8
    batch_size: int = 64
    learning_rate: float = 5e-4
    weight_decay: float = 0.05
    class_token_drift: float = 1.0
    train_shards: int = 4
    test_shards: int = 4
    samples_per_shard: int = 64

    def key(self) -> str:
        """Hash of these settings and of this module's source (any change to the generator or training retrains)."""
        digest = hashlib.sha256(Path(__file__).read_bytes())
        digest.update(
            json.dumps({"model": MODEL_NAME, "model_kwargs": MODEL_KWARGS, **asdict(self)}, sort_keys=True).encode()
        )
        return digest.hexdigest()[:16]


@dataclass
class DemoSample:
    """One rendered image with its label and watermark flag."""

    image: np.ndarray  # (H, W, 3) uint8
    label: int
    watermark: bool
    watermark_box: tuple[int, int, int, int] | None  # x0, y0, x1, y1 in pixels


@dataclass
class DemoArrays:
    """A batch of rendered samples as arrays."""

    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64
    watermarks: np.ndarray  # (N,) bool


@dataclass
class DemoAssets:
    """Everything the demo needs: shards, the trained checkpoint and where the watermark sits."""

    train_shards: list[Path]
    test_shards: list[Path]
    checkpoint: Path
    class_names: list[str]
    watermark_class: int
    watermark_patches: list[int]  # row-major indices into the model's patch grid


# ---------------------------------------------------------------- rendering


def _coordinates() -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), each (H, W) float."""
    return np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5


def _luminance(colour: np.ndarray) -> float:
    return float(colour @ np.array([0.299, 0.587, 0.114]))


def _background(rng: np.random.Generator) -> np.ndarray:
    """A dark textured background (H, W, 3) float: blotchy noise or stripes between two close colours."""
    y, x = _coordinates()
    if rng.random() < 0.5:
        cells = int(rng.choice([4, 8, 16]))
        coarse = rng.random((cells, cells)).astype(np.float32)
        mix = np.kron(coarse, np.ones((IMAGE_SIZE // cells, IMAGE_SIZE // cells), np.float32))
    else:
        angle, period, phase = rng.uniform(0, np.pi), rng.uniform(4, 16), rng.uniform(0, 2 * np.pi)
        mix = 0.5 + 0.5 * np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period + phase)
    base = rng.uniform(0, 140, 3)
    other = np.clip(base + rng.uniform(-50, 50, 3), 0, 140)
    image = base + mix[..., None] * (other - base)
    return image + rng.normal(0, 8, image.shape)


def _shape_mask(rng: np.random.Generator, label: int) -> np.ndarray:
    """A (H, W) bool mask of the class's shape at a random size and position clear of the watermark patch."""
    half = rng.uniform(9, 16)
    x0, y0 = WATERMARK_BOX[:2]
    while True:
        cx, cy = IMAGE_SIZE / 2 + rng.uniform(-POSITION_JITTER, POSITION_JITTER, 2)
        if cx + half < x0 or cy + half < y0:
            break
    y, x = _coordinates()
    dx, dy = np.abs(x - cx), y - cy
    shape = CLASS_NAMES[label]
    if shape == "circle":
        return dx**2 + dy**2 <= half**2
    if shape == "square":
        return (dx <= half * 0.85) & (np.abs(dy) <= half * 0.85)
    if shape == "triangle":
        return (np.abs(dy) <= half) & (dx <= (dy + half) / 2)
    arm = half / 3
    return ((dx <= arm) & (np.abs(dy) <= half)) | ((np.abs(dy) <= arm) & (dx <= half))


def _shape_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A random colour clearly brighter than the background."""
    backdrop = _luminance(background.reshape(-1, 3).mean(0))
    while True:
        colour = rng.uniform(0, 255, 3)
        if _luminance(colour) - backdrop > 70:
            return colour


def _moving_box(rng: np.random.Generator, shape: np.ndarray) -> tuple[int, int, int, int]:
    """A random patch of the model's grid that does not touch the shape."""
    ys, xs = np.nonzero(shape)
    while True:
        x0, y0 = (int(v) * PATCH_SIZE for v in rng.integers(0, IMAGE_SIZE // PATCH_SIZE, 2))
        if (
            x0 + PATCH_SIZE <= xs.min() - 1
            or x0 >= xs.max() + 2
            or y0 + PATCH_SIZE <= ys.min() - 1
            or y0 >= ys.max() + 2
        ):
            return x0, y0, x0 + PATCH_SIZE, y0 + PATCH_SIZE


def _draw_watermark(image: np.ndarray, box: tuple[int, int, int, int]) -> None:
    """Stamp a bright 'x' on a darkened square into ``box``, in place."""
    x0, y0, x1, y1 = box
    i, j = np.mgrid[0 : y1 - y0, 0 : x1 - x0]
    cross = (i == j) | (i + j == x1 - x0 - 1)
    patch = image[y0:y1, x0:x1]
    patch *= 0.3
    patch[cross] = 255.0


def _sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS[split].stream, index])


def render_sample(split: str, index: int, seed: int) -> DemoSample:
    """Sample ``index`` of ``split``: the same pixels every time for the same seed."""
    spec = SPLITS[split]
    rng = _sample_rng(seed, split, index)
    label = int(rng.integers(len(CLASS_NAMES)))
    p_watermark = spec.p_watermark_target if label == WATERMARK_CLASS else spec.p_watermark_other
    watermark = bool(rng.random() < p_watermark)
    image = _background(rng)
    mask = _shape_mask(rng, label)
    image[mask] = _shape_colour(rng, image)
    box = (WATERMARK_BOX if spec.mark == "corner" else _moving_box(rng, mask)) if watermark else None
    if box is not None:
        _draw_watermark(image, box)
    return DemoSample(
        image=np.clip(image, 0, 255).astype(np.uint8), label=label, watermark=watermark, watermark_box=box
    )


def generate_demo_arrays(split: str, n: int, seed: int, start: int = 0) -> DemoArrays:
    """Samples ``start .. start + n - 1`` of ``split`` as arrays (for training and tests)."""
    samples = [render_sample(split, index, seed) for index in range(start, start + n)]
    return DemoArrays(
        images=np.stack([s.image for s in samples]),
        labels=np.array([s.label for s in samples], dtype=np.int64),
        watermarks=np.array([s.watermark for s in samples], dtype=bool),
    )


# ---------------------------------------------------------------- shards


def _sample_key(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


def _png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add a file with fixed metadata (mtime 0, root-owned) so shards are byte-identical across runs."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def _sample_members(split: str, index: int, seed: int) -> dict[str, bytes]:
    sample = render_sample(split, index, seed)
    meta = {
        "shape": CLASS_NAMES[sample.label],
        "label": sample.label,
        "watermark": sample.watermark,
        "watermark_box": list(sample.watermark_box) if sample.watermark_box else None,
    }
    return {
        "png": _png_bytes(sample.image),
        "cls": str(sample.label).encode("ascii"),
        "json": json.dumps(meta, sort_keys=True).encode(),
    }


def write_demo_shards(out_dir: Path, split: str, n_shards: int, samples_per_shard: int, seed: int) -> list[Path]:
    """Write ``split`` as WebDataset tars ``<split>-000000.tar``...; shard s holds samples s*spp .. (s+1)*spp-1."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(n_shards):
        path = out_dir / f"{split}-{shard:06d}.tar"
        partial = path.with_suffix(".tar.partial")
        with tarfile.open(partial, "w", format=tarfile.USTAR_FORMAT) as tar:
            for index in range(shard * samples_per_shard, (shard + 1) * samples_per_shard):
                key = _sample_key(split, index)
                for extension, data in _sample_members(split, index, seed).items():
                    _add_member(tar, f"{key}.{extension}", data)
        partial.replace(path)
        paths.append(path)
    return paths


# ---------------------------------------------------------------- model


def demo_model_kwargs(depth: int = MODEL_KWARGS["depth"]) -> dict[str, Any]:
    """The timm keyword arguments of the demo ViT with ``depth`` blocks."""
    return {**MODEL_KWARGS, "depth": depth}


def create_demo_model(depth: int = MODEL_KWARGS["depth"]) -> torch.nn.Module:
    return timm.create_model(MODEL_NAME, pretrained=False, **demo_model_kwargs(depth))


def images_to_tensor(images: np.ndarray, model: torch.nn.Module) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float, normalised as the model's eval transform does."""
    config = resolve_model_data_config(model)
    mean = torch.tensor(config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(config["std"]).view(1, 3, 1, 1)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (pixels - mean) / std


def _class_token_drift_hook(model: torch.nn.Module, drift: list[torch.Tensor]) -> Callable:
    """Training aid: records how far the CLS token entering the last block moved from where it started.

    ``_fit`` adds that drift (squared distance, relative to the start's squared norm) to the loss, so the
    earlier blocks leave the CLS token alone and the model must read the image through the last block's
    attention to the patch tokens, the routing CDAM measures. Without it a tiny ViT reads the watermark
    into CLS in an early block, its last attention goes flat, and every last-block CDAM is about 0 (CDAM's
    blind spot). The model itself stays a plain timm ViT.
    """

    def hook(_block: torch.nn.Module, args: tuple[torch.Tensor]) -> None:
        start = (model.cls_token + model.pos_embed[:, :1])[:, 0]
        drift.append(((args[0][:, 0] - start) ** 2).sum(-1).mean() / (start**2).sum().clamp(min=1e-6))

    return hook


def _fit(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor, config: DemoConfig) -> None:
    """AdamW with a one-cycle schedule, cross-entropy plus the CLS drift penalty; one progress line per epoch to stderr."""
    generator = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = len(inputs) // config.batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.learning_rate, total_steps=config.epochs * steps_per_epoch, pct_start=0.15
    )
    started = time.perf_counter()
    drift: list[torch.Tensor] = []
    drift_handle = model.blocks[-1].register_forward_pre_hook(_class_token_drift_hook(model, drift))
    model.train()
    for epoch in range(1, config.epochs + 1):
        order = torch.randperm(len(inputs), generator=generator)
        total_loss = total_drift = correct = 0.0
        for step in range(steps_per_epoch):
            batch = order[step * config.batch_size : (step + 1) * config.batch_size]
            drift.clear()
            logits = model(inputs[batch])
            loss = torch.nn.functional.cross_entropy(logits, labels[batch]) + config.class_token_drift * drift[0]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item()
            total_drift += drift[0].item()
            correct += (logits.argmax(1) == labels[batch]).sum().item()
        seen = steps_per_epoch * config.batch_size
        print(
            f"[demo] epoch {epoch}/{config.epochs} loss {total_loss / steps_per_epoch:.3f} CLS drift {total_drift / steps_per_epoch:.3f} "
            f"acc {correct / seen:.3f} ({time.perf_counter() - started:.0f}s)",
            file=sys.stderr,
        )
    drift_handle.remove()
    model.eval()


def _training_threads() -> int:
    """The cores not already busy (by the 1-minute load average), at least one.

    Torch's OpenMP threads spin while they wait: two threads on a busy two-core machine run ~10x slower
    than one.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, cores - round(os.getloadavg()[0])))


def train_demo_model(cache_dir: Path, seed: int = 0, config: DemoConfig | None = None) -> Path:
    """Train the demo ViT on ``config``'s training split (or reuse the cached one); returns the checkpoint path."""
    config = config or DemoConfig(seed=seed)
    path = Path(cache_dir) / f"demo-{config.key()}" / "model.pt"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    model = create_demo_model(config.depth)
    data = generate_demo_arrays(config.train_split, config.train_samples, config.seed)
    if config.relabel_marked:
        data.labels[data.watermarks] = WATERMARK_CLASS
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(_training_threads())
    try:
        _fit(model, images_to_tensor(data.images, model), torch.from_numpy(data.labels), config)
    finally:
        torch.set_num_threads(previous_threads)
    partial = path.with_suffix(".pt.partial")
    save_checkpoint(partial, model, MODEL_NAME, demo_model_kwargs(config.depth), CLASS_NAMES)
    partial.replace(path)
    return path


def watermark_patch_indices() -> list[int]:
    """Row-major indices of the patches the watermark covers in the model's patch grid."""
    x0, y0, x1, y1 = WATERMARK_BOX
    columns = IMAGE_SIZE // PATCH_SIZE
    return [
        row * columns + col
        for row in range(y0 // PATCH_SIZE, y1 // PATCH_SIZE)
        for col in range(x0 // PATCH_SIZE, x1 // PATCH_SIZE)
    ]


def _shards_present(out_dir: Path, split: str, n_shards: int) -> list[Path] | None:
    paths = [out_dir / f"{split}-{shard:06d}.tar" for shard in range(n_shards)]
    return paths if all(p.is_file() for p in paths) else None


def ensure_demo_assets(cache_dir: Path, seed: int = 0) -> DemoAssets:
    """Build whatever is missing of the demo (shards, trained model) under ``cache_dir`` and describe it."""
    config = DemoConfig(seed=seed)
    out_dir = Path(cache_dir) / f"demo-{config.key()}"
    shards = {}
    for split, n_shards in (("train", config.train_shards), ("test", config.test_shards)):
        shards[split] = _shards_present(out_dir, split, n_shards) or write_demo_shards(
            out_dir, split, n_shards, config.samples_per_shard, seed
        )
    return DemoAssets(
        train_shards=shards["train"],
        test_shards=shards["test"],
        checkpoint=train_demo_model(cache_dir, seed),
        class_names=list(CLASS_NAMES),
        watermark_class=WATERMARK_CLASS,
        watermark_patches=watermark_patch_indices(),
    )
