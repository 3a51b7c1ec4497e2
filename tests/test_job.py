"""End to end: WebDataset shards in, a real local Ray cluster, Zarr + Parquet out (local folder and moto S3)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import xarray as xr
from PIL import Image

from cdam_worker import CDAMExplainer, Concept, load_model
from cdam_worker.run_files import open_zarr
from cdam_worker.shards.samples import Sample
from cdam_worker.shards.tar_reader import iter_samples
from cdam_worker.storage import Storage
from helpers import gradient_image, image_bytes, make_shard, save_tiny_vit, two_actor_explain_argv
from jobs.cli import main
from jobs.verify import verify_output

MODEL_KWARGS = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3, num_classes=6)
SHARD_SIZES = (11, 7, 13)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    """Three shards of photos-like images of varied sizes and modes, and a small trained-looking checkpoint."""
    root = tmp_path_factory.mktemp("dataset")
    rng = np.random.default_rng(0)
    shards = []
    for s, size in enumerate(SHARD_SIZES):
        samples = []
        for i in range(size):
            width, height = int(rng.integers(20, 90)), int(rng.integers(20, 90))
            if i % 4 == 0:
                ext, encoded = "png", image_bytes(gradient_image(width, height, "L"), "PNG")
            else:
                ext, encoded = (
                    "jpg",
                    image_bytes(
                        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)), "JPEG", quality=92
                    ),
                )
            samples.append(
                (
                    f"s{s}/img{i:03d}",
                    {ext: encoded, "cls": str(int(rng.integers(0, 6))).encode(), "json": b'{"source": "test"}'},
                )
            )
        shards.append(str(make_shard(root / f"train-{s:04d}.tar", samples)))
    checkpoint = save_tiny_vit(root / "model.pt", MODEL_KWARGS, ["cat", "dog", "zebra", "analog clock", "car", "tree"])
    return {"root": root, "shards": shards, "checkpoint": checkpoint, "spec": str(root / "train-{0000..0002}.tar")}


def expected_rows(dataset: dict, targets: str, **explain_kwargs) -> dict[str, object]:
    """What the engine returns for every image explained alone, keyed by sample key."""
    loaded = load_model(checkpoint=dataset["checkpoint"])
    explainer = CDAMExplainer(loaded)
    expected = {}
    for shard in dataset["shards"]:
        for _, item in iter_samples(shard):
            assert isinstance(item, Sample)
            expected[item.key] = explainer.explain(
                loaded.transform(item.image)[None], targets, keys=[item.key], **explain_kwargs
            )
    return expected


def check_output(url: str, dataset: dict, targets: str, store_basis: bool = False) -> None:
    storage = Storage.from_url(url)
    group = open_zarr(storage, mode="r")
    tables = [pq.read_table(io.BytesIO(storage.get(path))) for path in storage.list("metadata")]
    rows = [row for table in tables for row in table.to_pylist()]
    assert len(rows) == sum(SHARD_SIZES)
    assert len({row["key"] for row in rows}) == len(rows)
    expected = expected_rows(dataset, targets, return_basis=store_basis)
    for row in rows:
        result = expected[row["key"]]
        index = row["row"]
        assert np.array_equal(group["target_class"][index], result.target_class[0].numpy())
        assert row["targets"] == result.target_class[0].tolist()
        for name in ["cdam", "attention", "embedding", "logits"] + (["basis"] if store_basis else []):
            stored, reference = group[name][index], getattr(result, name)[0].numpy()
            assert np.abs(stored - reference).max() <= 1e-5 * np.abs(reference).max(), (name, row["key"])
        assert row["pred"] == int(result.logits[0].argmax())
        assert row["relevance_argmax"] == result.cdam[0].flatten(1).argmax(1).tolist()
        assert row["target_names"][0] in ("cat", "dog", "zebra", "analog clock", "car", "tree")
    assert verify_output(url) == []


def test_local_job_matches_engine_and_is_queryable(ray_local, dataset, tmp_path, capsys):
    output = str(tmp_path / "out")
    assert main(two_actor_explain_argv(dataset, output, "--targets", "topk:2")) == 0
    check_output(output, dataset, "topk:2")
    phases = re.search(
        r"^phases: planning [\d.]+ s, .*explaining [\d.]+ s, .*shutdown [\d.]+ s", capsys.readouterr().out, re.M
    )
    assert phases, "the summary names each phase's time"
    timings = json.loads(Path(output, "manifest.json").read_text())["timings"]
    assert {"planning", "waiting_for_actors", "explaining", "actors"} <= set(timings) and min(timings.values()) >= 0

    count = duckdb.sql(
        f"SELECT count(*), count(DISTINCT key), min(row) >= 0 FROM '{output}/metadata/*.parquet'"
    ).fetchall()[0]
    assert count == (sum(SHARD_SIZES), sum(SHARD_SIZES), True)
    per_shard = dict(duckdb.sql(f"SELECT shard, count(*) FROM '{output}/metadata/*.parquet' GROUP BY shard").fetchall())
    assert per_shard == {f"train-{s:04d}": n for s, n in enumerate(SHARD_SIZES)}

    data = xr.open_zarr(f"{output}/cdam.zarr", consolidated=False)
    assert data["cdam"].dims == ("image", "target", "y", "x")
    assert data["attention"].dims == ("image", "head", "y", "x")
    assert data.attrs["class_names"][2] == "zebra" and data.attrs["patch_grid"] == [4, 4]
    assert data.attrs["targets"] == "topk:2" and data.attrs["method"] == "closed_form"


def test_s3_shards_to_s3_output_with_basis_and_class_names(ray_local, dataset, s3_bucket, s3_client):
    for shard in dataset["shards"]:
        s3_client.upload_file(shard, s3_bucket, f"data/{Path(shard).name}")
    output = f"s3://{s3_bucket}/runs/a"
    args = two_actor_explain_argv(dataset, output, "--targets", "classes:zebra,1", "--store-basis")
    args[args.index("--shards") + 1] = f"s3://{s3_bucket}/data/train-{{0000..0002}}.tar"
    assert main(args) == 0
    check_output(output, dataset, "classes:2,1", store_basis=True)


def test_concepts_from_a_saved_vector_and_a_folder_of_examples(ray_local, dataset, tmp_path):
    loaded = load_model(checkpoint=dataset["checkpoint"])
    explainer = CDAMExplainer(loaded)
    examples = tmp_path / "stripes"
    examples.mkdir()
    for i in range(3):
        gradient_image(40 + 8 * i, 30).save(examples / f"example{i}.png")
    folder_concept = explainer.concept_from_images(
        "stripes", torch.stack([loaded.transform(Image.open(f).convert("RGB")) for f in sorted(examples.iterdir())])
    )
    saved = Concept("noise", torch.randn(loaded.model.num_features, generator=torch.Generator().manual_seed(0)))
    saved.save(tmp_path / "noise.pt")

    output = str(tmp_path / "out")
    assert (
        main(
            two_actor_explain_argv(
                dataset,
                output,
                "--targets",
                "topk:1",
                "--concepts",
                f"stripes={examples}",
                f"noise={tmp_path / 'noise.pt'}:cosine",
            )
        )
        == 0
    )
    group = open_zarr(Storage.from_url(output), mode="r")
    concepts = group.attrs["concepts"]
    assert [c["name"] for c in concepts] == ["stripes", "noise"] and [c["similarity"] for c in concepts] == [
        "dot",
        "cosine",
    ]
    assert np.allclose(concepts[0]["vector"], folder_concept.vector.numpy(), rtol=1e-5, atol=1e-6)
    cosine = Concept("noise", saved.vector, "cosine")
    rows = duckdb.sql(f"SELECT key, row, targets, target_names FROM '{output}/metadata/*.parquet'").fetchall()
    assert len(rows) == sum(SHARD_SIZES)
    by_key = {item.key: item for shard in dataset["shards"] for _, item in iter_samples(shard)}
    for key, row, targets, names in rows[:6]:
        assert targets[1:] == [-1, -1] and names[1:] == ["stripes", "noise"]
        image = loaded.transform(by_key[key].image)[None]
        expected = explainer.explain(image, "topk:1", concepts=[folder_concept, cosine]).cdam[0].numpy()
        stored = group["cdam"][row]
        assert np.abs(stored - expected).max() <= 1e-4 * np.abs(expected).max()


def test_rerun_skips_completed_shards_and_refuses_other_settings(ray_local, dataset, tmp_path, capsys):
    output = str(tmp_path / "out")
    assert main(two_actor_explain_argv(dataset, output, "--targets", "topk:1")) == 0
    before = {p: p.read_bytes() for p in Path(output).rglob("*") if p.is_file() and "lock" not in p.name}
    assert main(two_actor_explain_argv(dataset, output, "--targets", "topk:1")) == 0
    assert "3 already done before this run" in capsys.readouterr().out
    after = {p: p.read_bytes() for p in Path(output).rglob("*") if p.is_file()}
    assert before == after

    assert main(two_actor_explain_argv(dataset, output, "--targets", "topk:2")) == 2
    assert "was made with different settings (targets)" in capsys.readouterr().err
    assert main(two_actor_explain_argv(dataset, output, "--targets", "topk:2", "--overwrite")) == 0
    assert verify_output(output) == []


def test_dry_run_prints_plan_and_writes_nothing(ray_local, dataset, tmp_path, capsys):
    output = tmp_path / "dry"
    assert main(two_actor_explain_argv(dataset, str(output), "--dry-run", "--targets", "all")) == 0
    printed = capsys.readouterr().out
    assert "3 (31 samples, 16 rows reserved per shard)" in printed
    assert "all + 0 concept(s) = 6 maps per image" in printed
    assert not (output / "manifest.json").exists()
