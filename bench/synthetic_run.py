"""A synthetic cdam run in the real output format, written with the job's own writer classes.

For benchmarks and tests of the reading side at sizes no test can explain for real (50,000 images):
``write_synthetic_run("out", 50_000)`` writes ``cdam.zarr``, per-shard Parquet metadata, markers and a
complete manifest, exactly as ``cdam explain`` lays them out (``cdam verify`` accepts the result).

The maps are not noise: each is a smooth Gaussian blob at a random place; for ``marked_class`` a share
``marked_share`` of its images also carries a compact mark of strong relevance on the top edge that the
rival targets do not share (a planted shortcut for audit benchmarks). Optionally each sample gets a small
PNG in a real WebDataset shard, so ``Run.image`` works too, or a photograph-sized JPEG (``photo_size``: what
ImageNet's are, for benchmarks of the views).
"""

from __future__ import annotations

import argparse
import io
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cdam_worker import __version__
from cdam_worker.pipeline.sinks import ExplainedRow, ShardWriter, create_zarr
from cdam_worker.run_files import open_zarr, write_json
from cdam_worker.shards.member_index import member_offsets
from cdam_worker.storage import Storage
from schemas import Layout, rows_per_shard_for
from schemas.manifest import MANIFEST_FORMAT, fingerprint
from schemas.paths import MANIFEST_PATH

TOPK = 5


def write_synthetic_run(
    dest: str,
    n_images: int,
    *,
    n_classes: int = 1000,
    n_targets: int = TOPK,
    grid: tuple[int, int] = (14, 14),
    n_heads: int = 6,
    embed_dim: int = 384,
    images_per_shard: int = 1000,
    maps_dtype: str = "float16",
    marked_class: int = 0,
    marked_share: float = 0.3,
    with_images: bool = False,
    photo_size: tuple[int, int] | None = None,
    seed: int = 0,
    class_names: list[str] | None = None,
    key_prefix: str = "",
    sample_json: str | None = None,
) -> dict[str, np.ndarray]:
    """Write a complete run of ``n_images`` images with ``--targets topk:{n_targets}`` into ``dest``; with
    ``with_images``, shards of small PNGs, or of JPEGs of ``photo_size`` (width, height) if given.
    ``class_names`` (default ``class-0000`` ...), ``key_prefix`` (before each key's file name; no '/' or '.')
    and ``sample_json`` (every sample's json member) are for tests of what the views make of hostile text.

    Returns the ground truth: ``keys``, ``pred``, ``marked`` (bool per image, in key order).
    """
    rng = np.random.default_rng(seed)
    storage = Storage.from_url(dest)
    sizes = [min(images_per_shard, n_images - start) for start in range(0, n_images, images_per_shard)]
    names = [f"synthetic-{index:06d}" for index in range(len(sizes))]
    urls = [_shard_url(dest, name) if with_images else f"{storage.url}/shards/{name}.tar" for name in names]
    rows_per_shard = rows_per_shard_for(max(sizes))
    layout = Layout(
        len(sizes), rows_per_shard, n_targets, n_heads, grid, embed_dim, n_classes, maps_dtype, store_basis=False
    )
    class_names = class_names or [f"class-{c:04d}" for c in range(n_classes)]
    settings = {
        "model": {
            "name": "synthetic",
            "kwargs": {},
            "pretrained": False,
            "checkpoint_sha256": None,
            "head_checkpoint_sha256": None,
        },
        "targets": f"topk:{n_targets}",
        "concepts": [],
        "variant": {"variant": "vanilla"},
        "maps_dtype": maps_dtype,
        "store_basis": False,
        "method": "closed_form",
        "precision": "float32",
        "rows_per_shard": rows_per_shard,
        "shards": [{"index": i, "url": url, "n_samples": n} for i, (url, n) in enumerate(zip(urls, sizes))],
    }
    run_id = fingerprint(settings)[:12]
    attributes = {
        "cdam_version": __version__,
        "run_fingerprint": fingerprint(settings),
        "model": settings["model"],
        "method": "closed_form",
        "class_names": class_names,
        "patch_grid": list(grid),
        "patch_size": [16, 16],
        "input_size": [3, grid[0] * 16, grid[1] * 16],
        "data_config": {
            "input_size": [3, grid[0] * 16, grid[1] * 16],
            "mean": [0.5] * 3,
            "std": [0.5] * 3,
            "interpolation": "bicubic",
            "crop_pct": 0.9,
            "crop_mode": "center",
        },
        "num_prefix_tokens": 1,
        "targets": settings["targets"],
        "concepts": [],
        "variant": settings["variant"],
        "seed": 0,
        "maps_dtype": maps_dtype,
        "rows_per_shard": rows_per_shard,
        "shards": names,
    }
    create_zarr(storage, layout, attributes)
    group = open_zarr(storage)
    truth: dict[str, list] = {"keys": [], "pred": [], "marked": []}
    summaries = []
    for index, (name, url, size) in enumerate(zip(names, urls, sizes)):
        keys = [f"{name}/{key_prefix}{j:06d}" for j in range(size)]
        pred, targets, maps, marked = _shard_maps(rng, size, n_classes, n_targets, grid, marked_class, marked_share)
        writer = ShardWriter(storage, group, layout, index, name, url, size, run_id)
        if with_images:
            _write_shard(url, keys, pred, marked, grid, photo_size)
            writer.add_members(
                [
                    (key, member, offset, length)
                    for key, files in member_offsets(url).items()
                    for member, offset, length in files
                ]
            )
        _add_rows(writer, rng, keys, pred, targets, maps, layout, class_names, sample_json)
        summaries.append(writer.finish())
        truth["keys"] += keys
        truth["pred"] += pred.tolist()
        truth["marked"] += marked.tolist()
    manifest = {
        "format": MANIFEST_FORMAT,
        "cdam_version": __version__,
        "status": "complete",
        "fingerprint": fingerprint(settings),
        "settings": settings,
        "layout": {
            "rows_per_shard": rows_per_shard,
            "n_targets": n_targets,
            "grid": list(grid),
            "maps_dtype": maps_dtype,
            "store_basis": False,
        },
        "shards": [s.manifest_entry() for s in summaries],
        "totals": {"images": sum(s.n_images for s in summaries), "errors": 0},
    }
    write_json(storage, MANIFEST_PATH, manifest)
    return {name: np.asarray(values) for name, values in truth.items()}


def _shard_maps(
    rng: np.random.Generator,
    size: int,
    n_classes: int,
    n_targets: int,
    grid: tuple[int, int],
    marked_class: int,
    marked_share: float,
):
    """Predictions, target classes (top-k, pred first), maps (size, T, gh, gw) and which images are marked."""
    gh, gw = grid
    pred = rng.integers(0, n_classes, size)
    others = (pred[:, None] + rng.integers(1, n_classes, (size, n_targets - 1))) % n_classes
    targets = np.concatenate([pred[:, None], others], axis=1)
    yy, xx = np.mgrid[0:gh, 0:gw]
    centres = rng.uniform(0, 1, (size, n_targets, 2)) * [gh - 1, gw - 1]
    widths = rng.uniform(1.0, 3.0, (size, n_targets, 1, 1))
    d2 = (yy - centres[..., 0, None, None]) ** 2 + (xx - centres[..., 1, None, None]) ** 2
    maps = np.exp(-d2 / (2 * widths**2)) * rng.uniform(0.5, 1.5, (size, n_targets, 1, 1))
    maps += rng.normal(0, 0.05, maps.shape)
    marked = (pred == marked_class) & (rng.uniform(size=size) < marked_share)
    column = rng.integers(0, gw, size)  # the mark moves along the top edge
    mark = np.zeros((size, gh, gw))
    mark[np.arange(size), 0, column] = 4.0
    maps[:, 0] += marked[:, None, None] * mark
    return pred, targets, maps.astype(np.float32), marked


def _add_rows(
    writer: ShardWriter,
    rng: np.random.Generator,
    keys: list[str],
    pred: np.ndarray,
    targets: np.ndarray,
    maps: np.ndarray,
    layout: Layout,
    class_names: list[str],
    sample_json: str | None,
) -> None:
    size, n_targets = targets.shape
    logits = rng.normal(0, 1, (size, layout.n_classes)).astype(np.float32)
    logits[np.arange(size)[:, None], targets] += np.linspace(6, 3, n_targets, dtype=np.float32)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    top = np.argsort(-probs, axis=1)[:, :TOPK]
    flat = maps.reshape(size, n_targets, -1)
    attention = rng.uniform(0, 1, (size, layout.n_heads, *layout.grid)).astype(np.float32)
    attention /= attention.sum((2, 3), keepdims=True)
    embedding = rng.normal(0, 1, (size, layout.embed_dim)).astype(np.float32)
    names = np.asarray(class_names, dtype=object)
    for j in range(size):
        writer.add(
            ExplainedRow(
                local_row=j,
                key=keys[j],
                label=int(pred[j]) if j % 5 else int((pred[j] + 1) % layout.n_classes),
                width=64,
                height=64,
                sample_json=sample_json,
                arrays={
                    "cdam": maps[j],
                    "target_class": targets[j].astype(np.int32),
                    "attention": attention[j],
                    "embedding": embedding[j],
                    "logits": logits[j],
                },
                table={
                    "pred": int(top[j, 0]),
                    "pred_prob": float(probs[j, top[j, 0]]),
                    "topk_classes": top[j].tolist(),
                    "topk_probs": probs[j, top[j]].tolist(),
                    "targets": targets[j].tolist(),
                    "target_names": names[targets[j]].tolist(),
                    "relevance_pos_sum": np.clip(flat[j], 0, None).sum(1).tolist(),
                    "relevance_neg_sum": np.clip(flat[j], None, 0).sum(1).tolist(),
                    "relevance_argmax": flat[j].argmax(1).tolist(),
                },
            )
        )


def _shard_url(dest: str, name: str) -> str:
    return (
        f"{dest.rstrip('/')}/shards/{name}.tar"
        if dest.startswith("s3://")
        else str(Path(dest).resolve() / "shards" / f"{name}.tar")
    )


def _write_shard(
    url: str,
    keys: list[str],
    pred: np.ndarray,
    marked: np.ndarray,
    grid: tuple[int, int],
    photo_size: tuple[int, int] | None,
) -> None:
    """Small PNGs (a grey level per class, a white bar on the top edge where marked) in a real tar; or, with
    ``photo_size``, JPEGs of that size (a class-tinted gradient under a textured noise, as costly to decode
    as a photograph of that size)."""
    textures = _textures(photo_size) if photo_size else []
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for index, (key, cls, mark) in enumerate(zip(keys, pred, marked)):
            if photo_size:
                pixels = np.clip(
                    textures[index % len(textures)] + np.asarray([int(cls) % 7, int(cls) % 11, int(cls) % 13]) * 12,
                    0,
                    255,
                ).astype(np.uint8)
                extension, image_format = "jpg", "JPEG"
            else:
                pixels = np.full((grid[0] * 4, grid[1] * 4, 3), 40 + int(cls) % 200, dtype=np.uint8)
                extension, image_format = "png", "PNG"
            if mark:
                pixels[: max(4, pixels.shape[0] // 14)] = 255
            encoded = io.BytesIO()
            Image.fromarray(pixels).save(
                encoded, format=image_format, **({"quality": 85} if image_format == "JPEG" else {})
            )
            for member_extension, data in ((extension, encoded.getvalue()), ("cls", str(int(cls)).encode())):
                info = tarfile.TarInfo(f"{key}.{member_extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    from cdam_worker.storage import split_url

    storage, name = split_url(url)
    storage.put(name, buffer.getvalue())


def _textures(size: tuple[int, int], count: int = 8) -> list[np.ndarray]:
    """``count`` (height, width, 3) float pictures: smooth gradients under fine noise."""
    width, height = size
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    textures = []
    for _ in range(count):
        a, b, c = rng.uniform(0.3, 1.0, 3)
        base = np.stack(
            [
                120 * a * x / width,
                120 * b * y / height,
                60 + 60 * c * np.sin(x / (20 + 40 * a)) * np.cos(y / (20 + 40 * b)),
            ],
            axis=-1,
        )
        textures.append(base + rng.normal(0, 14, (height, width, 3)).astype(np.float32))
    return textures


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic cdam run in the real output format.")
    parser.add_argument("output")
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--with-images", action="store_true", help="also write the samples' PNGs into real shards")
    args = parser.parse_args()
    started = time.perf_counter()
    write_synthetic_run(args.output, args.images, with_images=args.with_images)
    print(f"wrote {args.images} images to {args.output} in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
