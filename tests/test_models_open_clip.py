"""open_clip image towers (``--model open_clip:ARCH --checkpoint FILE``): converted into timm, maps equal the literal
definition on open_clip's own module (hooked at the last block's ``ln_1``), through ``cdam explain``.

The model is a small custom architecture, given the way users give one (a config JSON file), created by
``open_clip.create_model`` without pretrained weights and saved with ``torch.save(model.state_dict())``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from tests.helpers import explain_argv
from cdam_worker import CDAMExplainer, Concept, load_model
from cdam_worker.shards.samples import Sample
from cdam_worker.shards.tar_reader import iter_samples
from cdam_worker.demo_assets import write_demo_shards
from cdam_worker.maps.model import ModelLoadError
from cdam_worker.reading import open_run
from jobs.cli import main

TINY = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def tiny_config(folder: Path, name: str = "cdam-tiny-clip", **vision: object) -> Path:
    config = json.loads(json.dumps(TINY))
    config["vision_cfg"].update(vision)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory) -> dict[str, Path]:
    """A config file, the model created from it (weights perturbed off their init) and its state dict."""
    root = tmp_path_factory.mktemp("open_clip")
    return perturbed_clip_files(tiny_config(root), seed=0)


def perturbed_clip_files(config: Path, seed: int) -> dict[str, Path]:
    """The open_clip model of ``config`` (registered with open_clip here), its weights moved off their init by
    0.05 x noise drawn after ``torch.manual_seed(seed)``, saved as ``tiny.pt`` next to ``config``."""
    open_clip.add_model_config(config)
    torch.manual_seed(seed)
    model = open_clip.create_model(config.stem).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    checkpoint = config.parent / "tiny.pt"
    torch.save(model.state_dict(), checkpoint)
    return {"config": config, "checkpoint": checkpoint}


def open_clip_model(files: dict[str, Path]) -> torch.nn.Module:
    open_clip.add_model_config(files["config"])
    model = open_clip.create_model(files["config"].stem).eval()
    model.load_state_dict(torch.load(files["checkpoint"], weights_only=True))
    return model


def literal_cdam(clip_model: torch.nn.Module, image: torch.Tensor, score) -> torch.Tensor:
    """Spec section 4 on open_clip's module: T = the last block's ln_1 output, S_i = T_i . dscore/dT_i."""
    captured = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        captured["T"] = output

    handle = clip_model.visual.transformer.resblocks[-1].ln_1.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            score(clip_model.encode_image(image[None])[0]).backward()
    finally:
        handle.remove()
    tokens = captured["T"]
    tokens, grad = (
        (tokens, tokens.grad) if tokens.shape[0] == 1 else (tokens.transpose(0, 1), tokens.grad.transpose(0, 1))
    )
    return (tokens * grad).sum(-1)[0, 1:].detach()


def test_image_tower_equals_encode_image_and_maps_equal_the_literal_definition(clip_files):
    loaded = load_model(f"open_clip:{clip_files['config']}", checkpoint=clip_files["checkpoint"])
    clip_model = open_clip_model(clip_files)
    explainer = CDAMExplainer(loaded)
    assert explainer.method == "closed_form"
    assert loaded.model.num_features == TINY["embed_dim"] and loaded.checkpoint_sha256
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = clip_model.encode_image(images)
    concept = Concept("probe", torch.randn(TINY["embed_dim"], generator=torch.Generator().manual_seed(2)))
    result = explainer.explain(images, "none", concepts=[concept, Concept("probe_cosine", concept.vector, "cosine")])
    assert (result.embedding - expected).abs().max() <= 1e-5 * expected.abs().max()
    vector = concept.vector
    for index, image in enumerate(images):
        for slot, score in enumerate(
            (lambda out: out @ vector, lambda out: torch.nn.functional.cosine_similarity(out, vector, dim=0))
        ):
            reference = literal_cdam(clip_model, image, score).reshape(4, 4)
            assert (result.cdam[index, slot] - reference).abs().max() <= 1e-4 * reference.abs().max()


def test_transform_equals_open_clips_preprocessing(clip_files):
    from PIL import Image

    loaded = load_model(f"open_clip:{clip_files['config']}", checkpoint=clip_files["checkpoint"])
    _model, _train, preprocess = open_clip.create_model_and_transforms(clip_files["config"].stem)
    rng = np.random.default_rng(0)
    for width, height in ((64, 48), (45, 70)):
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        assert torch.allclose(loaded.transform(image), preprocess(image), atol=1e-6)


def test_bad_open_clip_models_are_refused(clip_files, tmp_path):
    with pytest.raises(ModelLoadError, match="needs its weights"):
        load_model(f"open_clip:{clip_files['config']}")
    with pytest.raises(ModelLoadError, match="unknown open_clip model"):
        load_model("open_clip:No-Such-Model", checkpoint=clip_files["checkpoint"])
    avg = tiny_config(tmp_path, "cdam-tiny-avg", pool_type="avg")
    torch.save(open_clip_model(clip_files).state_dict(), tmp_path / "avg.pt")
    with pytest.raises(ModelLoadError, match="needs CLS-token pooling"):
        load_model(f"open_clip:{avg}", checkpoint=tmp_path / "avg.pt")
    other = tiny_config(tmp_path, "cdam-tiny-wide", width=96)
    with pytest.raises(ModelLoadError, match="does not fit open_clip cdam-tiny-wide"):
        load_model(f"open_clip:{other}", checkpoint=clip_files["checkpoint"])


def open_clip_explain_argv(
    shards: Sequence[str | Path], output: Path, clip_files: dict[str, Path], targets: str, concepts: str
) -> list[str]:
    """``cdam explain`` of ``shards`` into ``output`` with the open_clip model of ``clip_files``."""
    return explain_argv(
        shards,
        output,
        f"open_clip:{clip_files['config']}",
        "--checkpoint",
        str(clip_files["checkpoint"]),
        "--targets",
        targets,
        "--concepts",
        concepts,
    )


def test_cdam_explain_on_an_open_clip_checkpoint(ray_local, clip_files, tmp_path, capsys):
    shards = write_demo_shards(tmp_path / "shards", "test", n_shards=2, samples_per_shard=2, seed=3)
    vector = torch.randn(TINY["embed_dim"], generator=torch.Generator().manual_seed(4))
    Concept("probe", vector).save(tmp_path / "probe.pt")
    output = tmp_path / "out"
    args = open_clip_explain_argv(shards, output, clip_files, "none", f"probe={tmp_path / 'probe.pt'}")
    assert main([*args, "--dry-run"]) == 0
    assert "closed form" in capsys.readouterr().out
    assert main(args) == 0
    run = open_run(str(output))
    clip_model = open_clip_model(clip_files)
    loaded = load_model(f"open_clip:{clip_files['config']}", checkpoint=clip_files["checkpoint"])
    samples = {item.key: item for shard in shards for _, item in iter_samples(str(shard)) if isinstance(item, Sample)}
    rows = run.metadata.to_table(columns=["key", "row"]).to_pylist()
    assert len(rows) == 4
    for row in rows:
        stored = run.read_rows("cdam", np.array([row["row"]]))[0, 0]
        reference = (
            literal_cdam(clip_model, loaded.transform(samples[row["key"]].image), lambda out: out @ vector)
            .reshape(stored.shape)
            .numpy()
        )
        assert np.abs(stored - reference).max() <= 1e-4 * np.abs(reference).max()
