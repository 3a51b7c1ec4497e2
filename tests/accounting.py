"""Shared by the bad-sample and fuzz tests: an in-process shard processor (no Ray) on a tiny model, and the
property every processed shard must have: each sample explained or in errors/, exactly once."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from cdam_worker.pipeline.actor import ShardProcessor
from cdam_worker.pipeline.plan import ExplainOptions, make_plan
from cdam_worker.pipeline.run_output import prepare_output
from cdam_worker.pipeline.settings import ShardTask
from cdam_worker.run_files import open_zarr
from cdam_worker.shards.specs import shard_name
from cdam_worker.shards.tar_reader import scan_shard
from cdam_worker.storage import Storage
from helpers import make_shard, png_bytes, save_tiny_vit
from schemas import CHUNK_ROWS
from schemas.manifest import ModelSpec, ShardSummary
from schemas.paths import shard_file_stem

MODEL_KWARGS = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3, num_classes=6)
CLASS_NAMES = ["cat", "dog", "zebra", "analog clock", "car", "tree"]
PLACEHOLDER_SAMPLES = 40  # the plan's shard: its size sets rows_per_shard (48), the most samples a test shard may have


def write_checkpoint(path: Path) -> str:
    """A tiny ViT (32x32 input, 4x4 tokens, 6 classes) saved the way cdam saves checkpoints."""
    return save_tiny_vit(path, MODEL_KWARGS, CLASS_NAMES)


def in_process_processor(root: Path, targets: str) -> ShardProcessor:
    """A ShardProcessor of a planned job (output under ``root``), run in this process on the CPU."""
    root.mkdir(parents=True, exist_ok=True)
    placeholder = make_shard(
        root / "placeholder.tar", [(f"p{i}", {"png": png_bytes(8, 8), "cls": b"1"}) for i in range(PLACEHOLDER_SAMPLES)]
    )
    checkpoint = write_checkpoint(root / "model.pt")
    model = ModelSpec(None, checkpoint=str(Path(checkpoint).resolve()))
    plan = make_plan(
        ExplainOptions(shards=(str(placeholder),), output=str(root / "out"), model=model, targets=targets, batch_size=4)
    )
    prepare_output(plan, overwrite=False)
    processor = ShardProcessor(device="cpu", threads=1, decode_workers=1)
    processor.configure(plan.config, plan.layout, plan.loaded)
    return processor


def process(processor: ShardProcessor, shard: str) -> tuple[list[str], ShardSummary]:
    """Scan a shard as the driver does and explain it as shard 0 of the processor's job."""
    scan = scan_shard(shard)
    assert len(scan.keys) <= processor.layout.rows_per_shard, "test shard too large for the planned rows"
    return scan.keys, processor.process_shard(ShardTask(0, shard, shard_name(shard), len(scan.keys)))


def storable(key: str) -> str:
    """A key as errors/ stores it (lone surrogates from undecodable tar names escaped)."""
    return key.encode("utf-8", "backslashreplace").decode("utf-8")


def assert_every_sample_accounted(
    processor: ShardProcessor, keys: list[str], summary: ShardSummary
) -> tuple[list[dict], list[dict]]:
    """Each scanned sample is explained (at its row, with its key) or an error row, exactly once; returns both tables."""
    storage = Storage.from_url(processor.config.output)
    stem = shard_file_stem(summary.shard_index, summary.shard)
    metadata = pq.read_table(io.BytesIO(storage.get(f"metadata/{stem}.parquet"))).to_pylist()
    errors = pq.read_table(io.BytesIO(storage.get(f"errors/{stem}.parquet"))).to_pylist() if summary.n_errors else []
    assert not storage.exists(f"errors/{stem}.parquet") or summary.n_errors
    assert summary.unaccounted() is None, summary.unaccounted()
    assert (summary.n_samples, summary.n_images, summary.n_errors) == (len(keys), len(metadata), len(errors))
    assert summary.n_shard_errors == sum(row["key"] is None for row in errors)

    explained = [row["row"] for row in metadata]
    assert explained == sorted(set(explained)) and all(0 <= row < len(keys) for row in explained)
    assert [row["key"] for row in metadata] == [keys[row] for row in explained]
    not_explained = Counter(storable(keys[i]) for i in range(len(keys)) if i not in set(explained))
    assert Counter(row["key"] for row in errors if row["key"] is not None) == not_explained
    for row in errors:
        assert row["reason"] and "\n" not in row["reason"] and row["shard"] == summary.shard

    # Zarr: rows of written chunks hold data exactly where a sample was explained (fill values elsewhere)
    if explained:
        written_chunks = sorted({row // CHUNK_ROWS for row in explained})
        embedding = open_zarr(storage, mode="r")["embedding"]
        for chunk in written_chunks:
            values = embedding[chunk * CHUNK_ROWS : (chunk + 1) * CHUNK_ROWS, 0]
            rows = set(range(chunk * CHUNK_ROWS, (chunk + 1) * CHUNK_ROWS))
            assert {r for r, value in zip(sorted(rows), values) if not np.isnan(value)} == rows & set(explained)
    return metadata, errors
