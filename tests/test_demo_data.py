"""The offline demo's data and model: valid deterministic shards, a planted watermark, and CDAMs that find it."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cdam_worker.demo_assets import (
    CLASS_NAMES,
    IMAGE_SIZE,
    WATERMARK_BOX,
    WATERMARK_CLASS,
    DemoAssets,
    ensure_demo_assets,
    generate_demo_arrays,
    images_to_tensor,
    render_sample,
    watermark_patch_indices,
    write_demo_shards,
)
from cdam_worker.maps.model import LoadedModel, load_model
from reference import reference_cdam


@pytest.fixture(scope="session")
def demo_model(demo_assets: DemoAssets) -> LoadedModel:
    return load_model(checkpoint=demo_assets.checkpoint)


def read_tar(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {member.name: tar.extractfile(member).read() for member in tar.getmembers()}


def test_shards_are_webdataset_tars_with_expected_members(tmp_path: Path) -> None:
    paths = write_demo_shards(tmp_path, "test", n_shards=2, samples_per_shard=3, seed=7)
    assert [p.name for p in paths] == ["test-000000.tar", "test-000001.tar"]
    for shard, path in enumerate(paths):
        members = read_tar(path)
        keys = [f"test-{index:06d}" for index in range(shard * 3, shard * 3 + 3)]
        assert list(members) == [f"{key}.{ext}" for key in keys for ext in ("png", "cls", "json")]
        for index, key in zip(range(shard * 3, shard * 3 + 3), keys):
            label = int(members[f"{key}.cls"].decode("ascii"))
            meta = json.loads(members[f"{key}.json"])
            image = np.asarray(Image.open(io.BytesIO(members[f"{key}.png"])))
            assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
            sample = render_sample("test", index, seed=7)
            assert np.array_equal(image, sample.image)
            box = list(WATERMARK_BOX) if sample.watermark else None
            assert meta == {
                "shape": CLASS_NAMES[label],
                "label": label,
                "watermark": sample.watermark,
                "watermark_box": box,
            }


def test_shard_generation_is_deterministic(tmp_path: Path) -> None:
    first = write_demo_shards(tmp_path / "a", "train", 1, 8, seed=3)[0].read_bytes()
    again = write_demo_shards(tmp_path / "b", "train", 1, 8, seed=3)[0].read_bytes()
    other_seed = write_demo_shards(tmp_path / "c", "train", 1, 8, seed=4)[0].read_bytes()
    assert first == again
    assert first != other_seed


def test_watermark_is_planted_as_specified() -> None:
    train = generate_demo_arrays("train", 800, seed=0)
    on_target = train.watermarks[train.labels == WATERMARK_CLASS].mean()
    on_others = train.watermarks[train.labels != WATERMARK_CLASS].mean()
    assert 0.88 <= on_target <= 1.0 and 0.0 < on_others <= 0.1
    assert set(np.bincount(train.labels, minlength=len(CLASS_NAMES)) > 150) == {True}

    test = generate_demo_arrays("test", 200, seed=0)
    clean = generate_demo_arrays("clean", 200, seed=0)
    assert 0.35 <= test.watermarks.mean() <= 0.65 and not clean.watermarks.any()  # half of every class
    x0, y0, x1, y1 = WATERMARK_BOX
    outside = np.ones((IMAGE_SIZE, IMAGE_SIZE), bool)
    outside[y0:y1, x0:x1] = False
    assert np.array_equal(test.labels, clean.labels)
    assert np.array_equal(test.images[:, outside], clean.images[:, outside])
    marked = test.watermarks
    assert np.array_equal(test.images[~marked], clean.images[~marked])
    assert all(
        not np.array_equal(a, b) for a, b in zip(test.images[marked][:, ~outside], clean.images[marked][:, ~outside])
    )


def test_eval_transform_keeps_the_watermark_patch(demo_model: LoadedModel) -> None:
    """The checkpoint's own eval transform is exactly the training preprocessing: no crop cuts the corner."""
    images = generate_demo_arrays("test", 4, seed=1).images
    transformed = torch.stack([demo_model.transform(Image.fromarray(image)) for image in images])
    assert torch.allclose(transformed, images_to_tensor(images, demo_model.model), atol=1e-5)
    assert watermark_patch_indices() == [demo_model.model.patch_embed.num_patches - 1]


def test_demo_assets_are_complete_and_cached(demo_assets: DemoAssets, demo_model: LoadedModel) -> None:
    assert all(path.is_file() for path in demo_assets.train_shards + demo_assets.test_shards)
    assert demo_model.class_names == demo_assets.class_names == CLASS_NAMES
    assert demo_assets.watermark_class == WATERMARK_CLASS
    assert ensure_demo_assets(demo_assets.checkpoint.parent.parent) == demo_assets


def accuracy(model: LoadedModel, split: str, n: int) -> float:
    data = generate_demo_arrays(split, n, seed=0)
    with torch.no_grad():
        predictions = model.model(images_to_tensor(data.images, model.model)).argmax(1).numpy()
    return float((predictions == data.labels).mean())


def test_model_learned_the_shapes(demo_model: LoadedModel) -> None:
    assert accuracy(demo_model, "clean", 256) >= 0.6


def test_watermark_class_cdam_concentrates_on_the_watermark(demo_model: LoadedModel, demo_assets: DemoAssets) -> None:
    """Positive CDAM of the watermarked class falls on the watermark at >= 3x its area share (watermarked test images)."""
    model = demo_model.model
    data = generate_demo_arrays("test", 64, seed=0)
    inputs = images_to_tensor(data.images[data.watermarks], model)
    patches = demo_assets.watermark_patches
    area_share = len(patches) / model.patch_embed.num_patches
    ratios = []
    for image in inputs:
        positive = reference_cdam(model, image, lambda logits, _pre: logits[demo_assets.watermark_class]).clamp(min=0)
        share_on_watermark = positive[patches].sum() / positive.sum().clamp(min=1e-12)  # 0 when nothing is positive
        ratios.append(float(share_on_watermark) / area_share)
    assert np.mean(ratios) >= 3.0, f"watermark relevance is only {np.mean(ratios):.2f}x its area share"
