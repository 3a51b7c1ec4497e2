"""Classes of interest written as text for CLIP models: ``--concepts NAME=text:...|prompts:FILE`` and zero-shot
``--targets text:FILE``, on open_clip and on a transformers CLIPModel folder, through ``cdam explain`` and
``derive``; maps compared with the literal definition on each library's own module.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from test_models_hf import literal_cdam as hf_literal_cdam
from test_models_open_clip import literal_cdam as open_clip_literal_cdam
from test_models_open_clip import open_clip_explain_argv, open_clip_model, perturbed_clip_files, tiny_config

from tests.helpers import explain_argv
from cdam_worker import load_model
from cdam_worker.shards.samples import Sample
from cdam_worker.shards.tar_reader import iter_samples
from cdam_worker.demo_assets import write_demo_shards
from cdam_worker.derive import derive_maps
from cdam_worker.reading import open_run
from cdam_worker.maps.text_concepts import (
    TextError,
    parse_zero_shot_targets,
    read_class_prompts,
)
from jobs.cli import main


def clip_recipe(embeddings: torch.Tensor) -> torch.Tensor:
    """CLIP's zero-shot vector of several prompt embeddings: normalise, average, normalise."""
    return F.normalize(F.normalize(embeddings, dim=-1).mean(0), dim=0)


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("open_clip_text")
    return perturbed_clip_files(tiny_config(root, "cdam-tiny-text-clip"), seed=3)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[Path]:
    return write_demo_shards(tmp_path_factory.mktemp("text_shards"), "test", n_shards=2, samples_per_shard=2, seed=9)


def samples_of(shards: list[Path]) -> dict[str, Sample]:
    return {item.key: item for shard in shards for _, item in iter_samples(str(shard)) if isinstance(item, Sample)}


def test_class_files_and_zero_shot_targets(tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_text("# zero-shot classes\ncat\ndog: a photo of a dog | a blurry photo of a dog\n\nwatermark\n")
    assert read_class_prompts(classes) == {
        "classes": ["cat", "dog", "watermark"],
        "prompts": [
            ["a photo of a cat."],
            ["a photo of a dog", "a blurry photo of a dog"],
            ["a photo of a watermark."],
        ],
    }
    assert parse_zero_shot_targets(f"text:{classes}")[1] == "topk:3"  # top 5, capped by the 3 classes
    assert parse_zero_shot_targets(f"text:{classes}:2")[1] == "topk:2"
    assert parse_zero_shot_targets("topk:2") is None
    (tmp_path / "bad.txt").write_text("cat\ndog:\n")
    with pytest.raises(TextError, match=r"bad.txt:2: expected NAME or NAME: prompt"):
        read_class_prompts(tmp_path / "bad.txt")
    (tmp_path / "twice.txt").write_text("cat\ncat\n")
    with pytest.raises(TextError, match="class 'cat' appears twice"):
        read_class_prompts(tmp_path / "twice.txt")


def test_text_needs_a_model_with_a_text_tower(tmp_path, shards, capsys):
    vision_only = tmp_path / "clip_vision"
    tf.CLIPVisionModelWithProjection(
        tf.CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            projection_dim=8,
        )
    ).save_pretrained(vision_only)
    tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        vision_only
    )
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    base = ["explain", "--shards", str(shards[0]), "--output", str(tmp_path / "out"), "--dry-run"]
    assert main([*base, "--model", f"hf:{vision_only}", "--targets", f"text:{classes}"]) == 2
    assert "the model has no text tower (text needs a CLIP model with both towers" in capsys.readouterr().err
    assert main([*base, "--model", f"hf:{vision_only}", "--targets", "none", "--concepts", "cat=text:a cat"]) == 2
    assert "--concepts cat: the model has no text tower" in capsys.readouterr().err
    assert (
        main(
            [
                *base,
                "--model",
                "vit_tiny_patch16_224",
                "--model-kwargs",
                '{"img_size": 32, "depth": 1}',
                "--targets",
                f"text:{classes}",
            ]
        )
        == 2
    )
    assert "zero-shot classes need a CLIP model with a text tower" in capsys.readouterr().err


def test_zero_shot_targets_and_a_text_concept_on_open_clip(ray_local, clip_files, shards, tmp_path, capsys):
    classes = tmp_path / "classes.txt"
    classes.write_text("circle\nsquare: a photo of a square | a drawing of a square\ntriangle\n")
    output = tmp_path / "out"
    args = open_clip_explain_argv(
        shards, output, clip_files, f"text:{classes}:2", 'mark=text:"a photo of a watermark":cosine'
    )
    assert main([*args, "--dry-run"]) == 0
    assert "autograd through the last block: the head is a ZeroShotHead" in capsys.readouterr().out
    assert main(args) == 0

    run = open_run(str(output))
    assert run.class_names == ["circle", "square", "triangle"] and run.attrs["targets"] == "topk:2"
    clip_model = open_clip_model(clip_files)
    tokenizer = open_clip.get_tokenizer(clip_files["config"].stem)
    with torch.no_grad():
        text = lambda prompts: clip_model.encode_text(tokenizer(prompts))
        class_vectors = torch.stack(
            [
                clip_recipe(text(["a photo of a circle."])),
                clip_recipe(text(["a photo of a square", "a drawing of a square"])),
                clip_recipe(text(["a photo of a triangle."])),
            ]
        )
        mark = clip_recipe(text(["a photo of a watermark"]))
    assert np.allclose(run.attrs["concepts"][0]["vector"], mark.numpy(), atol=1e-6)
    scale = clip_model.logit_scale.exp().item()
    loaded = load_model(f"open_clip:{clip_files['config']}", checkpoint=clip_files["checkpoint"])
    samples = samples_of(shards)
    for row in run.metadata.to_table(columns=["key", "row", "targets"]).to_pylist():
        image = loaded.transform(samples[row["key"]].image)
        with torch.no_grad():
            zero_shot_logits = scale * F.normalize(clip_model.encode_image(image[None]), dim=-1) @ class_vectors.T
        stored_logits = run.read_rows("logits", np.array([row["row"]]))[0]
        assert np.allclose(stored_logits, zero_shot_logits[0].numpy(), rtol=1e-5, atol=1e-5)
        assert row["targets"][:2] == zero_shot_logits[0].topk(2).indices.tolist() and row["targets"][2] == -1
        stored = run.read_rows("cdam", np.array([row["row"]]))[0]
        scores = [
            lambda out, c=c: scale * F.cosine_similarity(out, class_vectors[c], dim=0) for c in row["targets"][:2]
        ]
        scores.append(lambda out: F.cosine_similarity(out, mark, dim=0))
        for slot, score in enumerate(scores):
            reference = open_clip_literal_cdam(clip_model, image, score).reshape(stored.shape[-2:]).numpy()
            assert np.abs(stored[slot] - reference).max() <= 1e-4 * np.abs(reference).max(), (row["key"], slot)


def write_clip_tokenizer(folder: Path) -> tf.CLIPTokenizer:
    """CLIP's BPE vocabulary (the copy open_clip ships) as a transformers CLIPTokenizer saved in ``folder``."""
    from open_clip.tokenizer import SimpleTokenizer

    simple = SimpleTokenizer()
    vocab = dict(simple.encoder)
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = vocab.pop("<start_of_text>"), vocab.pop("<end_of_text>")
    (folder / "vocab.json").write_text(json.dumps(vocab))
    merges = sorted(simple.bpe_ranks.items(), key=lambda item: item[1])
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(pair) for pair, _ in merges) + "\n")
    tokenizer = tf.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    tokenizer.save_pretrained(folder)
    return tokenizer


def test_text_concepts_on_a_transformers_clip_model_and_derive(ray_local, shards, tmp_path):
    folder = tmp_path / "clip"
    folder.mkdir()
    tokenizer = write_clip_tokenizer(folder)
    config = tf.CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "vocab_size": 49408,
            "eos_token_id": 49407,
            "bos_token_id": 49406,
        },
        vision_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=24,
    )
    torch.manual_seed(4)
    hf_model = tf.CLIPModel(config).eval()
    with torch.no_grad():
        for parameter in hf_model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    hf_model.save_pretrained(folder, safe_serialization=True)
    tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    prompts = tmp_path / "stripes.txt"
    prompts.write_text("a photo of stripes\nstriped fabric\n")

    output = tmp_path / "out"
    args = explain_argv(
        shards, output, f"hf:{folder}", "--targets", "none", "--concepts", f"stripes=prompts:{prompts}", "--store-basis"
    )
    assert main(args) == 0
    run = open_run(str(output))

    def text(lines: list[str]) -> torch.Tensor:
        tokens = tokenizer(lines, padding=True, return_tensors="pt")
        with torch.no_grad():
            features = hf_model.get_text_features(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            )
        return getattr(features, "pooler_output", features)

    stripes = clip_recipe(text(["a photo of stripes", "striped fabric"]))
    assert np.allclose(run.attrs["concepts"][0]["vector"], stripes.numpy(), atol=1e-6)
    derived = derive_maps(
        run, "none", concepts=['dog=text:"a photo of a dog"']
    )  # the run's model reloaded for its text tower
    dog = clip_recipe(text(["a photo of a dog"]))
    loaded = load_model(f"hf:{folder}")
    samples = samples_of(shards)
    for index, key in enumerate(derived.coords["key"].values.tolist()):
        image = loaded.transform(samples[key].image)
        reference = hf_literal_cdam(hf_model, image, lambda out: out @ dog, 1).reshape(derived.shape[-2:]).numpy()
        assert np.abs(derived.values[index, 0] - reference).max() <= 1e-4 * np.abs(reference).max(), key
        row = int(derived.coords["row"].values[index])
        reference = hf_literal_cdam(hf_model, image, lambda out: out @ stripes, 1).reshape(derived.shape[-2:]).numpy()
        stored = run.read_rows("cdam", np.array([row]))[0, 0]
        assert np.abs(stored - reference).max() <= 1e-4 * np.abs(reference).max(), key
