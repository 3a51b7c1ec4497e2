"""``cdam_worker.load_model``: by name, from checkpoints (plain, wrapped, self-describing), backbone + probe, errors, safety.

Real files in ``tmp_path``, small random-weight ViTs, no mocks.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

from cdam_worker import LoadedModel, ModelLoadError, load_model, save_checkpoint

NAME = "vit_small_patch16_224"
TINY = dict(img_size=32, depth=1)  # a 2x2 patch grid, one block: fast


def tiny_model(num_classes: int = 6, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(NAME, **{**TINY, "num_classes": num_classes, **overrides}).eval()


def assert_same_weights(loaded: torch.nn.Module, original: torch.nn.Module) -> None:
    mine, theirs = loaded.state_dict(), original.state_dict()
    assert mine.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(mine[key], theirs[key]), key


def load_error(**kwargs) -> str:
    """The message of the ModelLoadError that ``load_model(**kwargs)`` raises; it must be one line."""
    with pytest.raises(ModelLoadError) as info:
        load_model(**kwargs)
    message = str(info.value)
    assert message and "\n" not in message and "\x1b" not in message and message.strip() == message
    return message


def features_of(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_head(model.forward_features(images), pre_logits=True)


# -- by name ------------------------------------------------------------------------------------


def test_load_by_name_passes_kwargs_to_timm():
    loaded = load_model(
        NAME, img_size=48, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=7, global_pool="avg"
    )
    model = loaded.model
    assert isinstance(loaded, LoadedModel) and loaded.name == NAME
    assert tuple(model.patch_embed.img_size) == (48, 48)
    assert tuple(model.patch_embed.patch_size) == (8, 8)
    assert tuple(model.patch_embed.grid_size) == (6, 6)
    assert model.embed_dim == model.num_features == 64
    assert len(model.blocks) == 2
    assert model.blocks[-1].attn.num_heads == 2
    assert model.num_classes == loaded.num_classes == 7 and model.head.weight.shape == (7, 64)
    assert model.global_pool == "avg"
    assert loaded.class_names == [f"class_{i}" for i in range(7)]
    assert loaded.model_kwargs["img_size"] == 48 and loaded.model_kwargs["depth"] == 2
    assert loaded.checkpoint_sha256 is None and loaded.head_checkpoint_sha256 is None


def test_model_is_in_eval_mode():
    model = load_model(NAME, **TINY, num_classes=3).model
    assert not model.training
    assert not any(module.training for module in model.modules())


@pytest.mark.parametrize("img_size", [32, 64])
def test_transform_gives_the_models_input_size(img_size):
    loaded = load_model(NAME, img_size=img_size, depth=1, num_classes=3)
    assert tuple(loaded.model.patch_embed.img_size) == (img_size, img_size)
    assert loaded.data_config["input_size"] == (3, img_size, img_size)
    for size in [(100, 70), (20, 45), (img_size, img_size)]:
        image = Image.new("RGB", size, color=(200, 30, 90))
        tensor = loaded.transform(image)
        assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32
        assert tuple(tensor.shape) == (3, img_size, img_size)
    with torch.no_grad():
        assert loaded.model(tensor[None]).shape == (1, 3)


def test_img_size_of_a_dynamic_size_model_sets_the_transform_only():
    loaded = load_model(NAME, img_size=48, depth=1, num_classes=2, dynamic_img_size=True)
    assert tuple(loaded.model.patch_embed.img_size) == (224, 224)  # position embeddings as trained
    assert tuple(loaded.transform(Image.new("RGB", (100, 70))).shape) == (3, 48, 48)
    with torch.no_grad():
        assert loaded.model(torch.randn(1, 3, 48, 48)).shape == (1, 2)


def test_transform_uses_mean_and_std_overrides():
    loaded = load_model(NAME, **TINY, num_classes=2, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    tensor = loaded.transform(Image.new("RGB", (32, 32), color=(255, 0, 51)))
    assert torch.allclose(tensor[:, 16, 16], torch.tensor([1.0, 0.0, 0.2]), atol=1e-6)


# -- plain state-dict checkpoints ---------------------------------------------------------------


@pytest.mark.parametrize("wrapping", ["plain", "state_dict", "module_prefix", "state_dict_module_prefix"])
def test_state_dict_checkpoint_loads_with_classes_from_head(tmp_path, wrapping):
    original = tiny_model(num_classes=9)
    state = original.state_dict()
    if "module_prefix" in wrapping:
        state = {f"module.{key}": value for key, value in state.items()}
    payload = {"state_dict": state, "epoch": 3} if wrapping.startswith("state_dict") else state
    path = tmp_path / "weights.pth"
    torch.save(payload, path)

    loaded = load_model(NAME, checkpoint=path, **TINY)
    assert loaded.num_classes == loaded.model.num_classes == 9  # read from head.weight
    assert_same_weights(loaded.model, original)
    assert loaded.checkpoint_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(images), original(images))


def test_state_dict_checkpoint_with_class_names(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(tiny_model(num_classes=3).state_dict(), path)
    loaded = load_model(NAME, checkpoint=path, class_names=["cat", "dog", "bird"], **TINY)
    assert loaded.class_names == ["cat", "dog", "bird"]
    assert loaded.class_index("dog") == 1 and loaded.class_index("BIRD") == 2 and loaded.class_index(0) == 0


# -- self-describing checkpoints ----------------------------------------------------------------


def test_saved_checkpoint_loads_from_the_file_alone(tmp_path):
    kwargs = dict(img_size=48, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=4)
    torch.manual_seed(3)
    original = timm.create_model(NAME, **kwargs).eval()
    names = ["circle", "square", "triangle", "cross"]
    path = tmp_path / "model.ckpt"
    save_checkpoint(path, original, NAME, kwargs, names)

    loaded = load_model(checkpoint=path)
    assert loaded.name == NAME
    assert loaded.class_names == names
    assert loaded.class_index("triangle") == 2
    with pytest.raises(ValueError, match="unknown class name 'squar'; did you mean 'square'"):
        loaded.class_index("squar")
    for key, value in kwargs.items():
        assert loaded.model_kwargs[key] == value
    assert tuple(loaded.model.patch_embed.patch_size) == (8, 8) and len(loaded.model.blocks) == 2
    assert_same_weights(loaded.model, original)
    assert tuple(loaded.transform(Image.new("RGB", (90, 60))).shape) == (3, 48, 48)

    # the same file named explicitly still loads; another name is refused
    assert load_model(NAME, checkpoint=path).class_names == names
    message = load_error(name="vit_tiny_patch16_224", checkpoint=path)
    assert str(path) in message and "vit_small_patch16_224" in message and "vit_tiny_patch16_224" in message


def test_saved_checkpoint_round_trips_again(tmp_path):
    original = tiny_model(num_classes=2)
    first = tmp_path / "first.ckpt"
    save_checkpoint(first, original, NAME, {**TINY, "num_classes": 2}, ["no", "yes"])
    loaded = load_model(checkpoint=first)
    second = tmp_path / "second.ckpt"
    save_checkpoint(second, loaded.model, loaded.name, loaded.model_kwargs, loaded.class_names)
    again = load_model(checkpoint=second)
    assert again.class_names == ["no", "yes"]
    assert_same_weights(again.model, original)


# -- backbone + linear head ---------------------------------------------------------------------


def check_probe(loaded: LoadedModel, backbone: torch.nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    images = torch.randn(3, 3, 32, 32)
    features = features_of(loaded.model, images)
    torch.testing.assert_close(features, features_of(backbone, images), rtol=0, atol=0)
    with torch.no_grad():
        logits = loaded.model(images)
    torch.testing.assert_close(logits, features @ weight.T + bias, rtol=1e-5, atol=1e-5)
    assert loaded.num_classes == loaded.model.num_classes == weight.shape[0]


@pytest.mark.parametrize(
    "head_payload",
    [
        lambda w, b: {"weight": w, "bias": b},
        lambda w, b: {"linear.weight": w, "linear.bias": b},
        lambda w, b: {"state_dict": {"module.fc.weight": w, "module.fc.bias": b}},
    ],
    ids=["bare", "linear_prefix", "wrapped_module_fc"],
)
def test_backbone_plus_linear_head(tmp_path, head_payload):
    backbone = tiny_model(num_classes=0)  # a feature extractor: no head.* keys
    backbone_path = tmp_path / "backbone.pth"
    torch.save(backbone.state_dict(), backbone_path)
    generator = torch.Generator().manual_seed(4)
    weight, bias = torch.randn(5, 384, generator=generator), torch.randn(5, generator=generator)
    head_path = tmp_path / "probe.pt"
    torch.save(head_payload(weight, bias), head_path)

    loaded = load_model(NAME, checkpoint=backbone_path, head_checkpoint=head_path, **TINY)
    check_probe(loaded, backbone, weight, bias)
    assert loaded.class_names == [f"class_{i}" for i in range(5)]
    assert loaded.head_checkpoint_sha256 == hashlib.sha256(head_path.read_bytes()).hexdigest()
    assert loaded.model_kwargs["num_classes"] == 5


def test_linear_head_replaces_a_backbone_head(tmp_path):
    backbone = tiny_model(num_classes=11)  # a classifier whose head the probe replaces
    backbone_path = tmp_path / "classifier.pth"
    torch.save(backbone.state_dict(), backbone_path)
    weight, bias = torch.randn(3, 384), torch.randn(3)
    head_path = tmp_path / "probe.pt"
    torch.save({"weight": weight, "bias": bias}, head_path)
    loaded = load_model(NAME, checkpoint=backbone_path, head_checkpoint=head_path, class_names=["a", "b", "c"], **TINY)
    check_probe(loaded, backbone, weight, bias)
    assert loaded.class_index("c") == 2


def test_linear_head_on_a_named_model_without_bias(tmp_path):
    weight = torch.randn(4, 384)
    head_path = tmp_path / "probe.pt"
    torch.save({"weight": weight}, head_path)
    loaded = load_model(NAME, head_checkpoint=head_path, **TINY)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model(images), features_of(loaded.model, images) @ weight.T, rtol=1e-5, atol=1e-5
        )


def test_linear_head_with_wrong_input_dim(tmp_path):
    head_path = tmp_path / "probe_768.pt"
    torch.save({"weight": torch.randn(5, 768), "bias": torch.randn(5)}, head_path)
    message = load_error(name=NAME, head_checkpoint=head_path, **TINY)
    assert str(head_path) in message and "768" in message and "384" in message


def test_head_checkpoint_that_is_not_one_linear_layer(tmp_path):
    head_path = tmp_path / "mlp_head.pt"
    torch.save(
        {
            "0.weight": torch.randn(8, 384),
            "0.bias": torch.randn(8),
            "2.weight": torch.randn(3, 8),
            "2.bias": torch.randn(3),
        },
        head_path,
    )
    message = load_error(name=NAME, head_checkpoint=head_path, **TINY)
    assert str(head_path) in message and "one linear layer" in message


# -- errors -------------------------------------------------------------------------------------


def test_unknown_model_name_has_a_hint():
    message = load_error(name="vit_smal_patch16_224")
    assert "unknown timm model 'vit_smal_patch16_224'" in message
    assert "did you mean" in message and "vit_small_patch16_224" in message


def test_non_vit_model_is_refused():
    message = load_error(name="resnet18", num_classes=3)
    assert "'resnet18'" in message and "ResNet" in message and "not a timm VisionTransformer" in message


def test_bad_model_kwargs():
    message = load_error(name=NAME, depth=1, not_a_timm_argument=3)
    assert "bad keyword arguments" in message and "not_a_timm_argument" in message


@pytest.mark.parametrize(
    "saved_with, expected",
    [
        (dict(depth=2), "unexpected 12 keys (e.g. blocks.1."),
        (dict(depth=1, drop_keys=("cls_token", "norm.bias")), "missing 2 keys (e.g. cls_token, norm.bias)"),
        (dict(depth=1, embed_dim=192, num_heads=3), "shape mismatch in"),
        (dict(depth=1, img_size=48), "pos_embed (1, 10, 384) vs (1, 5, 384)"),
    ],
    ids=["unexpected", "missing", "embed_dim", "img_size"],
)
def test_checkpoint_that_does_not_fit(tmp_path, saved_with, expected):
    saved_with = dict(saved_with)
    drop_keys = saved_with.pop("drop_keys", ())
    torch.manual_seed(0)
    other = timm.create_model(NAME, **{"img_size": 32, "num_classes": 4, **saved_with})
    state = {key: value for key, value in other.state_dict().items() if key not in drop_keys}
    path = tmp_path / "other.pth"
    torch.save(state, path)
    message = load_error(name=NAME, checkpoint=path, **TINY)
    assert f"checkpoint {path} does not fit model '{NAME}'" in message
    assert expected in message


def test_missing_checkpoint_file(tmp_path):
    path = tmp_path / "nowhere" / "model.pth"
    assert load_error(name=NAME, checkpoint=path, **TINY) == f"checkpoint file not found: {path}"
    assert load_error(name=NAME, head_checkpoint=path, **TINY) == f"checkpoint file not found: {path}"
    assert "checkpoint file not found" in load_error(name=NAME, checkpoint=tmp_path, **TINY)  # a directory


@pytest.mark.parametrize(
    "content",
    [b"these are not the weights you are looking for\n" * 20, b"", b"PK\x03\x04 truncated zip"],
    ids=["text", "empty", "broken_zip"],
)
def test_file_that_is_not_a_torch_file(tmp_path, content):
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    message = load_error(name=NAME, checkpoint=path, **TINY)
    assert message.startswith(
        f"cannot read checkpoint {path} as a weights-only torch file: not a torch file, or a damaged one ("
    )


def test_checkpoint_that_is_not_a_dict(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    assert load_error(name=NAME, checkpoint=path, **TINY) == f"checkpoint {path} holds a Tensor, not a state dict"


def test_class_names_count_mismatch(tmp_path):
    message = load_error(name=NAME, num_classes=3, class_names=["a", "b"], **TINY)
    assert message == "2 class names given for a model with 3 classes"
    path = tmp_path / "weights.pth"
    torch.save(tiny_model(num_classes=4).state_dict(), path)
    assert (
        load_error(name=NAME, checkpoint=path, class_names=["a"], **TINY)
        == "1 class names given for a model with 4 classes"
    )


def test_no_name_and_pretrained_with_checkpoint(tmp_path):
    assert "no model name given" in load_error()
    path = tmp_path / "weights.pth"
    torch.save(tiny_model().state_dict(), path)
    assert "not both" in load_error(name=NAME, pretrained=True, checkpoint=path, **TINY)


def test_pretrained_weights_that_cannot_be_had_are_one_line_errors(monkeypatch, tmp_path):
    import huggingface_hub.constants

    message = load_error(name="vit_small_patch16_224.no_such_tag", pretrained=True)
    assert message.startswith(
        "cannot get pretrained weights for 'vit_small_patch16_224.no_such_tag': RuntimeError: Invalid pretrained tag"
    )
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network, answered at once
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # and an empty cache
    message = load_error(name="vit_small_patch16_224.augreg_in21k_ft_in1k", pretrained=True)
    assert message.startswith("cannot get pretrained weights for 'vit_small_patch16_224.augreg_in21k_ft_in1k': ")
    assert "check the network or the cache, or pass a checkpoint file instead" in message


# -- security: no pickle code runs --------------------------------------------------------------

MARKER_NAME = "pwned.txt"


def write_marker(path: str) -> "object":
    """What a malicious pickle would call on load."""
    Path(path).write_text("arbitrary code ran")
    return object()


class RunsCodeOnReduce:
    """Unpickling this calls ``write_marker(path)``."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return write_marker, (self.path,)


class RunsCodeOnSetstate:
    """Unpickling this instantiates the class and calls ``__setstate__``."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __setstate__(self, state):
        write_marker(state["path"])
        self.__dict__.update(state)


@pytest.mark.parametrize("evil_class", [RunsCodeOnReduce, RunsCodeOnSetstate])
@pytest.mark.parametrize("where", ["checkpoint", "head_checkpoint"])
def test_pickled_objects_are_refused_and_never_run(tmp_path, evil_class, where):
    marker = tmp_path / MARKER_NAME
    path = tmp_path / "evil.pth"
    if where == "checkpoint":
        payload = {"state_dict": tiny_model(num_classes=2).state_dict(), "evil": evil_class(marker)}
    else:
        payload = {"weight": torch.randn(2, 384), "bias": torch.randn(2), "evil": evil_class(marker)}
    torch.save(payload, path)
    assert not marker.exists()

    message = load_error(name=NAME, **{where: path}, **TINY)
    assert message.startswith(
        f"cannot read checkpoint {path} as a weights-only torch file: it holds pickled Python objects"
    )
    assert f"{__name__}.{'write_marker' if evil_class is RunsCodeOnReduce else evil_class.__name__}" in message
    assert not marker.exists(), "the checkpoint's pickled code ran"

    # control: the file really is armed (an unsafe load would run the code)
    torch.load(path, weights_only=False)
    assert marker.exists()


# -- ImageNet class names -----------------------------------------------------------------------


def test_imagenet_class_names_for_a_1000_class_model():
    loaded = load_model(NAME, **TINY)  # timm's default head: 1000 ImageNet classes
    assert loaded.num_classes == 1000 and len(loaded.class_names) == 1000
    assert loaded.class_names[340] == "zebra"
    assert loaded.class_index("zebra") == 340
    assert loaded.class_index("analog clock") == 409
    assert loaded.class_index("Zebra") == 340 and loaded.class_index("340") == 340
    with pytest.raises(ValueError, match="class index 1000 is out of range"):
        loaded.class_index(1000)


def test_other_class_counts_get_generic_names():
    assert load_model(NAME, **TINY, num_classes=10).class_names == [f"class_{i}" for i in range(10)]
