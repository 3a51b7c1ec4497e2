"""Hugging Face transformers ViTs (``--model hf:FOLDER``): converted into timm, maps equal the literal definition
computed on the transformers module itself (hooked at its last layer's pre-attention norm), through ``cdam explain``.

Every model is made offline from a small transformers config, its weights perturbed so no layer is at its
initial value, and saved the way users do (``save_pretrained`` with safetensors, the image processor's
``save_pretrained``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf
from PIL import Image

from tests.helpers import explain_argv
from cdam_worker import CDAMExplainer, Concept, load_model
from cdam_worker.shards.samples import Sample
from cdam_worker.shards.tar_reader import iter_samples
from cdam_worker.demo_assets import write_demo_shards
from cdam_worker.maps.hf_models import hf_outputs, timm_outputs
from cdam_worker.maps.model import ModelLoadError
from cdam_worker.reading import open_run
from jobs.cli import main

SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 32, "patch_size": 8}
SQUASH_32 = {"size": {"height": 32, "width": 32}}


def _dinov2(config_class, **extra):
    return config_class(**SMALL, mlp_ratio=2, layerscale_value=0.5, **extra)


# name: (config, model class, image processor, prefix tokens, the path the engine must take)
FAMILIES = {
    "vit": (
        lambda: tf.ViTConfig(**SMALL, intermediate_size=128, num_labels=3),
        "ViTForImageClassification",
        lambda: tf.ViTImageProcessor(**SQUASH_32),
        1,
        "closed_form",
    ),
    "deit": (
        lambda: tf.DeiTConfig(**SMALL, intermediate_size=128, num_labels=3),
        "DeiTForImageClassification",
        lambda: tf.DeiTImageProcessor(**SQUASH_32, do_center_crop=False),
        2,
        "closed_form",
    ),
    "deit_distilled": (
        lambda: tf.DeiTConfig(**SMALL, intermediate_size=128, num_labels=3),
        "DeiTForImageClassificationWithTeacher",
        lambda: tf.DeiTImageProcessor(**SQUASH_32, do_center_crop=False),
        2,
        "autograd",
    ),
    # DINOv2 at 24 px: its position embedding (4x4) is resampled to the 3x3 grid, as transformers does
    "dinov2": (
        lambda: _dinov2(tf.Dinov2Config),
        "Dinov2Model",
        lambda: tf.BitImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 24, "width": 24}),
        1,
        "closed_form",
    ),
    "dinov2_classifier": (
        lambda: _dinov2(tf.Dinov2Config, num_labels=3),
        "Dinov2ForImageClassification",
        lambda: tf.BitImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 24, "width": 24}),
        1,
        "autograd",
    ),
    "dinov2_registers": (
        lambda: _dinov2(tf.Dinov2WithRegistersConfig, num_register_tokens=2),
        "Dinov2WithRegistersModel",
        lambda: tf.BitImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}),
        3,
        "closed_form",
    ),
    "dinov2_registers_classifier": (
        lambda: _dinov2(tf.Dinov2WithRegistersConfig, num_register_tokens=2, num_labels=3),
        "Dinov2WithRegistersForImageClassification",
        lambda: tf.BitImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 24, "width": 24}),
        3,
        "autograd",
    ),
    "clip_vision": (
        lambda: tf.CLIPVisionConfig(**SMALL, intermediate_size=128),
        "CLIPVisionModel",
        lambda: tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        1,
        "closed_form",
    ),
    "clip_projection": (
        lambda: tf.CLIPVisionConfig(**SMALL, intermediate_size=128, projection_dim=24),
        "CLIPVisionModelWithProjection",
        lambda: tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        1,
        "closed_form",
    ),
}


def last_pre_attention_norm(hf_model: torch.nn.Module) -> torch.nn.Module:
    """The norm whose output is the literal definition's T: the last encoder layer's pre-attention norm."""
    for path, norm in (
        ("vision_model.encoder.layers", "layer_norm1"),
        ("vit.layers", "layernorm_before"),
        ("vit.encoder.layer", "layernorm_before"),  # transformers 4.x
        ("deit.layers", "layernorm_before"),
        ("deit.encoder.layer", "layernorm_before"),  # transformers 4.x
        ("dinov2.encoder.layer", "norm1"),
        ("dinov2_with_registers.encoder.layer", "norm1"),
        ("encoder.layer", "norm1"),
        ("encoder.layers", "layer_norm1"),
    ):
        try:
            return getattr(hf_model.get_submodule(path)[-1], norm)
        except AttributeError:
            continue
    raise AssertionError(f"no pre-attention norm found in {type(hf_model).__name__}")


def literal_cdam(hf_model: torch.nn.Module, image: torch.Tensor, score, prefix: int) -> torch.Tensor:
    """Spec section 4 on the transformers module: T = last pre-attention norm's output, S_i = T_i . dscore/dT_i."""
    captured = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        captured["T"] = output

    handle = last_pre_attention_norm(hf_model).register_forward_hook(keep)
    try:
        with torch.enable_grad():
            score(hf_outputs(hf_model, image[None])[0]).backward()
    finally:
        handle.remove()
    tokens = captured["T"]
    return (tokens * tokens.grad).sum(-1)[0, prefix:].detach()


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory) -> dict[str, Path]:
    """Every family saved with save_pretrained (safetensors) + its image processor, weights perturbed off their init."""
    root = tmp_path_factory.mktemp("hf")
    folders = {}
    for index, (name, (config, architecture, processor, _prefix, _path)) in enumerate(FAMILIES.items()):
        torch.manual_seed(index)
        model = getattr(tf, architecture)(config()).eval()
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
        folders[name] = root / name
        model.save_pretrained(folders[name], safe_serialization=True)
        processor().save_pretrained(folders[name])
    return folders


def hf_model_of(folder: Path) -> torch.nn.Module:
    config = tf.AutoConfig.from_pretrained(folder)
    return (
        getattr(tf, config.architectures[0])
        .from_pretrained(folder, use_safetensors=True, attn_implementation="eager")
        .eval()
    )


def probe_images(size: int, count: int = 3) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_model_equals_transformers(hf_folders, family):
    loaded = load_model(f"hf:{hf_folders[family]}")
    hf_model = hf_model_of(hf_folders[family])
    images = probe_images(loaded.data_config["input_size"][1])
    with torch.no_grad():
        expected, got = hf_outputs(hf_model, images), timm_outputs(loaded.model, images)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert loaded.checkpoint_sha256 and len(loaded.checkpoint_sha256) == 64


@pytest.mark.parametrize("family", FAMILIES)
def test_maps_equal_the_literal_definition_on_the_transformers_module(hf_folders, family):
    _config, _architecture, _processor, prefix, path = FAMILIES[family]
    loaded = load_model(f"hf:{hf_folders[family]}")
    hf_model = hf_model_of(hf_folders[family])
    explainer = CDAMExplainer(loaded)
    assert explainer.method == path, explainer.method_reason
    images = probe_images(loaded.data_config["input_size"][1])
    concept = Concept("probe", torch.randn(loaded.model.num_features, generator=torch.Generator().manual_seed(2)))
    if loaded.num_classes:
        result = explainer.explain(images, "topk:2")
        classes = result.target_class
        scores = [[(lambda out, c=int(c): out[c]) for c in row] for row in classes]
    else:  # a feature extractor: a concept in its embedding space (dot and cosine)
        cosine = Concept("probe_cosine", concept.vector, "cosine")
        result = explainer.explain(images, "none", concepts=[concept, cosine])
        vector = concept.vector
        scores = [
            [lambda out: out @ vector, lambda out: torch.nn.functional.cosine_similarity(out, vector, dim=0)]
        ] * len(images)
    grid = result.cdam.shape[-2:]
    for image_index, image in enumerate(images):
        for slot, score in enumerate(scores[image_index]):
            reference = literal_cdam(hf_model, image, score, prefix).reshape(grid)
            got = result.cdam[image_index, slot]
            assert (got - reference).abs().max() <= 1e-4 * reference.abs().max(), (family, image_index, slot)


def test_captum_layer_gradient_x_activation_on_the_transformers_vit(hf_folders):
    from captum.attr import LayerGradientXActivation

    loaded = load_model(f"hf:{hf_folders['vit']}")
    hf_model = hf_model_of(hf_folders["vit"])
    images = probe_images(32, 2)
    result = CDAMExplainer(loaded).explain(images, "classes:1")
    attribution = LayerGradientXActivation(lambda x: hf_model(pixel_values=x).logits, last_pre_attention_norm(hf_model))
    captum_maps = attribution.attribute(images, target=1).sum(-1)[:, 1:].reshape(result.cdam[:, 0].shape)
    assert (result.cdam[:, 0] - captum_maps).abs().max() <= 1e-4 * captum_maps.abs().max()


@pytest.mark.parametrize("family", ["vit", "dinov2"])
def test_transform_equals_the_image_processor(hf_folders, family):
    loaded = load_model(f"hf:{hf_folders[family]}")
    processor = tf.AutoImageProcessor.from_pretrained(hf_folders[family], use_fast=False)
    rng = np.random.default_rng(0)
    for width, height in ((64, 48), (50, 70)):
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        expected = torch.as_tensor(processor(image, return_tensors="np")["pixel_values"][0])
        got = loaded.transform(image)
        assert got.shape == expected.shape
        assert (got - expected).abs().max() <= 1e-4 * expected.abs().max(), (family, width, height)


def test_class_names_come_from_id2label(tmp_path):
    config = tf.ViTConfig(**SMALL, intermediate_size=128, id2label={0: "cat", 1: "dog"}, label2id={"cat": 0, "dog": 1})
    tf.ViTForImageClassification(config).save_pretrained(tmp_path, safe_serialization=True)
    tf.ViTImageProcessor(**SQUASH_32).save_pretrained(tmp_path)
    loaded = load_model(f"hf:{tmp_path}")
    assert loaded.class_names == ["cat", "dog"] and loaded.class_index("dog") == 1


def test_pickled_weights_and_unsupported_architectures_are_refused(tmp_path):
    pickled = tmp_path / "pickled"  # an old-style folder: pytorch_model.bin (a pickle) instead of safetensors
    model = tf.ViTForImageClassification(tf.ViTConfig(**SMALL, intermediate_size=128))
    model.save_pretrained(pickled)
    tf.ViTImageProcessor(**SQUASH_32).save_pretrained(pickled)
    for weights in pickled.glob("*.safetensors"):
        weights.unlink()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"no \.safetensors weights \(pytorch_model\.bin is pickle"):
        load_model(f"hf:{pickled}")

    swin = tmp_path / "swin"
    tf.SwinForImageClassification(
        tf.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1], num_heads=[2])
    ).save_pretrained(swin)
    with pytest.raises(ModelLoadError, match="architecture 'SwinForImageClassification' is not supported"):
        load_model(f"hf:{swin}")
    with pytest.raises(ModelLoadError, match="no such folder, and not a hub repository name"):
        load_model(f"hf:{tmp_path / 'missing'}")
    no_processor = tmp_path / "no_processor"
    tf.ViTForImageClassification(tf.ViTConfig(**SMALL, intermediate_size=128)).save_pretrained(no_processor)
    with pytest.raises(ModelLoadError, match="no preprocessor_config.json"):
        load_model(f"hf:{no_processor}")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[Path]:
    return write_demo_shards(tmp_path_factory.mktemp("shards"), "test", n_shards=2, samples_per_shard=3, seed=5)


@pytest.mark.parametrize("family", ["vit", "dinov2_registers_classifier", "deit_distilled"])
def test_cdam_explain_on_a_transformers_folder(ray_local, hf_folders, shards, family, tmp_path, capsys):
    """The real loading path: the driver converts the model, the actors get it through Ray's object store."""
    _config, _architecture, _processor, prefix, path = FAMILIES[family]
    folder = hf_folders[family]
    output = tmp_path / "out"
    args = explain_argv(shards, output, f"hf:{folder}", "--targets", "topk:2")
    assert main([*args, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert ("closed form" if path == "closed_form" else "autograd through the last block") in printed
    assert main(args) == 0

    run = open_run(str(output))
    assert run.attrs["method"] == path and run.attrs["model"]["name"] == f"hf:{folder}"
    hf_model = hf_model_of(folder)
    loaded = load_model(f"hf:{folder}")
    samples = {item.key: item for shard in shards for _, item in iter_samples(str(shard)) if isinstance(item, Sample)}
    rows = run.metadata.to_table(columns=["key", "row", "targets"]).to_pylist()
    assert len(rows) == len(samples) == 6
    for row in rows:
        image = loaded.transform(samples[row["key"]].image)
        stored = run.read_rows("cdam", np.array([row["row"]]))[0]
        for slot, target in enumerate(row["targets"]):
            reference = (
                literal_cdam(hf_model, image, lambda out, c=target: out[c], prefix).reshape(stored.shape[-2:]).numpy()
            )
            assert np.abs(stored[slot] - reference).max() <= 1e-4 * np.abs(reference).max(), (row["key"], slot)
    assert run.load_model().class_names == loaded.class_names  # the manifest's record loads the same folder back
    if family == "vit":
        check_notebook_view(run, output, rows[0], tmp_path)


def check_notebook_view(run, output: Path, row: dict, tmp_path: Path) -> None:
    """``Run.show`` draws exactly ``cdam show``'s picture; ``_repr_html_`` summarises the run."""
    second = row["targets"][1]
    for target in (str(second), run.class_names[second], "attention"):
        picture = run.show(row["key"], second if target == str(second) else target, size=128)
        assert (
            main(
                [
                    "show",
                    str(output),
                    "--key",
                    row["key"],
                    "--target",
                    target,
                    "-o",
                    str(tmp_path / "show.png"),
                    "--size",
                    "128",
                ]
            )
            == 0
        )
        assert np.array_equal(
            np.asarray(picture.convert("RGB")), np.asarray(Image.open(tmp_path / "show.png").convert("RGB"))
        )
    summary = run._repr_html_()
    for expected in (
        run.attrs["model"]["name"],
        "closed form",
        "3: LABEL_0, LABEL_1, LABEL_2",
        "topk:2, 2 map(s) per image",
        "6 explained, 0 in errors/",
        "2 of 2 complete",
    ):
        assert expected in summary, expected


HUB_LOAD = """
import json, sys
import torch
from cdam_worker import load_model
loaded = load_model("hf:" + sys.argv[1])
image = torch.linspace(-1, 1, 3 * 32 * 32).reshape(1, 3, 32, 32)
with torch.no_grad():
    logits = loaded.model(image)[0].tolist()
print(json.dumps({"name": loaded.name, "classes": loaded.class_names, "logits": logits}))
"""


def test_a_hub_repository_name_loads_through_the_hub_s_own_cache(hf_folders, tmp_path) -> None:
    """``hf:ORG/NAME`` goes through huggingface_hub's ``snapshot_download``; here it finds the repository in a hub
    cache laid out as the hub writes it (offline, as on a cluster node with a pre-filled cache), and an unknown
    repository is one line."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    revision = "0123456789abcdef0123456789abcdef01234567"
    repository = tmp_path / "hub" / "models--cdam-test--tiny-vit"
    shutil.copytree(hf_folders["vit"], repository / "snapshots" / revision)
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text(revision)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}

    def load(name: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", HUB_LOAD, name], capture_output=True, text=True, timeout=300, env=env, check=False
        )

    done = load("cdam-test/tiny-vit")
    assert done.returncode == 0, done.stderr[-2000:]
    from_hub = json.loads(done.stdout.strip().splitlines()[-1])
    local = load_model(f"hf:{hf_folders['vit']}")
    with torch.no_grad():
        expected = local.model(torch.linspace(-1, 1, 3 * 32 * 32).reshape(1, 3, 32, 32))[0]
    assert from_hub["name"] == "hf:cdam-test/tiny-vit" and from_hub["classes"] == local.class_names
    assert np.allclose(from_hub["logits"], expected.numpy(), atol=1e-6)

    missing = load("cdam-test/no-such-model")
    assert missing.returncode != 0
    assert "--model hf:cdam-test/no-such-model: cannot download it from the Hugging Face Hub" in missing.stderr
