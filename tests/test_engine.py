"""The engine against the literal definition (spec section 4): every target kind, variant and model family."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import SwiGLU

from cdam_worker import CDAMExplainer, Concept, VariantConfig
from cdam_worker.maps.engine import cuda_fp32_precision
from cdam_worker.maps.memory_budget import chunks_in_budget
from cdam_worker.maps.variants import image_noise
from reference import reference_attention, reference_cdam

TOLERANCE = 1e-4

# name, timm kwargs, expected method
FAMILIES = {
    "cls_qkv_bias": ("vit_small_patch16_224", dict(img_size=64, depth=3, qkv_bias=True), "closed_form"),
    "cls_no_bias": ("vit_small_patch16_224", dict(img_size=48, depth=2, qkv_bias=False), "closed_form"),
    "registers_layerscale": (
        "vit_small_patch14_reg4_dinov2",
        dict(img_size=56, depth=3, init_values=0.5),
        "closed_form",
    ),
    "fc_norm_token": ("vit_small_patch16_224", dict(img_size=48, depth=2, fc_norm=True), "closed_form"),
    "distilled_deit": ("deit_small_distilled_patch16_224", dict(img_size=64, depth=3), "autograd"),
    "avg_pool_no_cls": (
        "vit_small_patch16_224",
        dict(img_size=64, depth=3, global_pool="avg", class_token=False, fc_norm=True),
        "autograd",
    ),
    "avg_pool_with_cls": ("vit_small_patch16_224", dict(img_size=48, depth=2, global_pool="avg"), "autograd"),
    "qk_norm": ("vit_small_patch16_224", dict(img_size=48, depth=2, qk_norm=True), "autograd"),
    # closed form through layers with their own forward-mode rules, and through the generic fallback
    "scale_norms_quick_gelu": (
        "vit_small_patch16_224",
        dict(
            img_size=48,
            depth=2,
            scale_attn_norm=True,
            scale_mlp_norm=True,
            act_layer="quick_gelu",
            init_values=0.3,
            pre_norm=True,
        ),
        "closed_form",
    ),
    "hybrid_resnet_stem": ("vit_small_r26_s32_224", dict(img_size=64, depth=2), "closed_form"),
    "swiglu_rmsnorm": (
        "vit_small_patch16_224",
        dict(img_size=48, depth=2, mlp_layer=SwiGLU, norm_layer="rmsnorm", act_layer="silu"),
        "closed_form",
    ),
}
CLOSED_FORM_FAMILIES = sorted(name for name, (_, _, method) in FAMILIES.items() if method == "closed_form")


def make_model(family: str, num_classes: int = 12) -> torch.nn.Module:
    """A random model of the family (the same weights every call)."""
    name, kwargs, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=num_classes, **kwargs).eval()
    with torch.no_grad():  # random norms and biases: no parameter sits at a special value
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.add_(0.2 * torch.randn_like(parameter))
    return model


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value - reference).abs().max() / reference.abs().max()).item()


def images_for(model: torch.nn.Module, batch: int = 3, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *model.patch_embed.img_size, generator=generator)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    model, method = make_model(request.param), FAMILIES[request.param][2]
    return model, CDAMExplainer(model), method


def test_method_is_chosen_per_family(family):
    _, explainer, method = family
    assert explainer.method == method
    assert method.replace("_", " ") in explainer.method_reason


def test_every_class_target_kind_matches_reference(family):
    model, explainer, _ = family
    images = images_for(model, batch=2)
    labels = torch.tensor([4, 11])
    per_image = torch.tensor([[1, 2], [11, 11]])
    cases = {"topk:3": None, "classes:5,7": None, "label": labels, "all": None}
    for spec, spec_labels in cases.items():
        result = explainer.explain(images, spec, labels=spec_labels)
        check_against_reference(model, images, result)
    result = explainer.explain(images, per_image)
    assert torch.equal(result.target_class, per_image)
    check_against_reference(model, images, result)


def test_topk_slots_follow_predictions(family):
    model, explainer, _ = family
    images = images_for(model)
    result = explainer.explain(images, "topk:4")
    assert torch.equal(result.target_class, result.logits.topk(4, dim=1).indices)
    with torch.no_grad():
        assert relative_error(result.logits, model(images)) < 1e-5
        assert (
            relative_error(result.embedding, model.forward_head(model.forward_features(images), pre_logits=True)) < 1e-5
        )


def test_concepts_dot_and_cosine_match_reference(family):
    model, explainer, _ = family
    images = images_for(model)
    examples = images_for(model, batch=4, seed=7)
    dot = explainer.concept_from_images("stripes", examples)
    cosine = Concept("stripes_cos", dot.vector, "cosine")
    result = explainer.explain(images, "topk:1", concepts=[dot, cosine])
    assert result.target_class[:, 1:].eq(-1).all()
    assert result.concept_names == ("stripes", "stripes_cos")
    check_against_reference(model, images, result, concepts=[dot, cosine])


def test_attention_is_cls_query_attention(family):
    model, explainer, _ = family
    images = images_for(model)
    result = explainer.explain(images, "topk:1")
    for b in range(images.shape[0]):
        assert relative_error(result.attention[b].flatten(1), reference_attention(model, images[b])) < TOLERANCE


@pytest.mark.parametrize("variant", ["smooth", "integrated"])
@pytest.mark.parametrize("family_name", ["cls_qkv_bias", "registers_layerscale", "distilled_deit", "avg_pool_no_cls"])
def test_smooth_and_integrated_match_reference(variant, family_name):
    model = make_model(family_name)
    explainer = CDAMExplainer(model)
    images = images_for(model, batch=2)
    keys = ["a/0001", "b/0002"]
    config = VariantConfig(variant, n_samples=5, noise_level=0.1, seed=3)
    concept = Concept("c", explainer.embed(images_for(model, 2, seed=9)).mean(0), "cosine")
    result = explainer.explain(images, "topk:2", concepts=[concept], keys=keys, variant=config)
    block_input = explainer.last_block_input(images)
    for b in range(2):
        span = block_input[b].max() - block_input[b].min()
        noise = image_noise(3, keys[b], torch.empty(config.n_maps, *block_input.shape[1:])) * 0.1 * span
        factors = (
            [1.0] * config.n_maps if variant == "smooth" else [k / config.n_samples for k in range(1, config.n_samples)]
        )
        for slot in range(3):
            score = score_for(result, b, slot, [concept])
            maps = [
                reference_cdam(altered_model(model, factors[s], noise[s]), images[b], score)
                for s in range(config.n_maps)
            ]
            expected = torch.stack(maps).mean(0)
            assert relative_error(result.cdam[b, slot].flatten(), expected) < TOLERANCE


def test_variant_noise_does_not_depend_on_batch_composition():
    model = make_model("cls_qkv_bias")
    explainer = CDAMExplainer(model)
    images = images_for(model, batch=3)
    config = VariantConfig("smooth", n_samples=6, seed=11)
    together = explainer.explain(images, "classes:2", keys=["x", "y", "z"], variant=config)
    alone = explainer.explain(images[1:2], "classes:2", keys=["y"], variant=config)
    assert relative_error(alone.cdam[0], together.cdam[1]) < 1e-5
    other_seed = explainer.explain(
        images[1:2], "classes:2", keys=["y"], variant=VariantConfig("smooth", n_samples=6, seed=12)
    )
    assert relative_error(other_seed.cdam[0], together.cdam[1]) > 1e-3


@pytest.mark.parametrize(
    "family_name, config",
    [
        ("cls_qkv_bias", VariantConfig("smooth", n_samples=4, seed=5)),
        ("avg_pool_no_cls", VariantConfig("integrated", n_samples=4, noise_level=0.02, seed=5)),
    ],
)
def test_chunking_of_variant_copies_does_not_change_the_maps(family_name, config):
    model = make_model(family_name)
    images = images_for(model, batch=3)
    keys = ["p", "q", "r"]
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    one_chunk = CDAMExplainer(model, max_rows=3 * config.n_maps)
    assert one_chunk.variant_chunks(3, tokens, config) == (3, config.n_maps)
    expected = one_chunk.explain(images, "topk:2", keys=keys, variant=config).cdam
    # one image and one copy per chunk; groups of two images; the whole batch, two copies per chunk
    for rows, plan in ((1, (1, 1)), (2, (2, 1)), (6, (3, 2))):
        explainer = CDAMExplainer(model, max_rows=rows)
        assert explainer.variant_chunks(3, tokens, config) == plan
        chunked = explainer.explain(images, "topk:2", keys=keys, variant=config).cdam
        assert relative_error(chunked, expected) <= 1e-6, rows


def test_gpu_chunks_fit_their_memory_budget():
    row, noise = 1000, 50 * 250  # bytes per row; noise of one image's 50 copies
    assert chunks_in_budget(1e9, batch=64, n_maps=50, row_bytes=row, noise_bytes=noise) == (
        64,
        50,
    )  # everything at once
    for budget in (2e5, 1e6, 3e6):
        images, copies = chunks_in_budget(budget, batch=64, n_maps=50, row_bytes=row, noise_bytes=noise)
        assert images * (noise + copies * row) <= budget and (copies == 50 or images == 1)
    assert chunks_in_budget(2e5, batch=64, n_maps=50, row_bytes=row, noise_bytes=noise) == (3, 50)
    assert chunks_in_budget(2e4, batch=64, n_maps=50, row_bytes=row, noise_bytes=noise) == (1, 7)
    assert chunks_in_budget(10, batch=64, n_maps=50, row_bytes=row, noise_bytes=noise) == (1, 1)  # one row at least


def test_variant_copies_follow_the_precision_unless_told_otherwise():
    model = make_model("cls_qkv_bias")
    images = images_for(model, batch=2)
    config = VariantConfig("smooth", n_samples=6, seed=2)
    assert CDAMExplainer(model, precision="bf16").variant_precision == "bf16"
    exact = CDAMExplainer(model).explain(images, "classes:1,2", keys=["u", "v"], variant=config)
    float32_copies = CDAMExplainer(model, precision="bf16", variant_precision="float32").explain(
        images, "classes:1,2", keys=["u", "v"], variant=config
    )
    bf16_copies = CDAMExplainer(model, precision="bf16").explain(images, "classes:1,2", keys=["u", "v"], variant=config)
    assert bf16_copies.cdam.dtype == torch.float32
    assert 0 < relative_error(bf16_copies.cdam, float32_copies.cdam) < 0.05
    assert 0 < relative_error(float32_copies.cdam, exact.cdam) < 0.05
    assert torch.equal(bf16_copies.logits, float32_copies.logits)  # the clean pass stays float32
    with pytest.raises(ValueError, match="variant_precision must be float32, bf16 or tf32, not 'fp8'"):
        CDAMExplainer(model, variant_precision="fp8")
    with pytest.raises(ValueError, match="max_rows must be at least 1, got 0"):
        CDAMExplainer(model, max_rows=0)


@pytest.mark.parametrize("family_name", ["cls_qkv_bias", "registers_layerscale", "avg_pool_no_cls"])
@pytest.mark.parametrize("variant", ["vanilla", "smooth"])
def test_maps_from_basis_match_direct_maps(family_name, variant):
    model = make_model(family_name)
    explainer = CDAMExplainer(model)
    images = images_for(model, batch=2)
    concept = Concept("c", torch.randn(model.num_features, generator=torch.Generator().manual_seed(5)))
    result = explainer.explain(
        images, "all", concepts=[concept], return_basis=True, variant=VariantConfig(variant, n_samples=4)
    )
    assert result.basis.shape == (2, model.num_features, *result.cdam.shape[2:])
    directions = torch.cat([model.head.weight, concept.vector[None]])  # (K, D)
    from_basis = torch.einsum("kd,bdyx->bkyx", directions, result.basis)
    assert relative_error(from_basis, result.cdam) < TOLERANCE


@pytest.mark.parametrize("family_name", CLOSED_FORM_FAMILIES)
def test_many_targets_use_the_column_route_and_still_match(family_name):
    model = make_model(family_name, num_classes=60)  # K=60 > N (at most 16 patches here)
    explainer = CDAMExplainer(model)
    images = images_for(model, batch=2)
    assert model.patch_embed.num_patches < 60
    result = explainer.explain(images, "all")
    check_against_reference(model, images, result, slots=[0, 17, 59])
    per_image = torch.stack([torch.arange(60), torch.arange(60).flip(0)])  # different classes per image
    result = explainer.explain(images, per_image)
    check_against_reference(model, images, result, slots=[0, 31])


@pytest.mark.parametrize("family_name", ["avg_pool_no_cls", "avg_pool_with_cls", "qk_norm", "distilled_deit"])
def test_more_targets_than_features_on_the_autograd_path(family_name):
    model = make_model(family_name, num_classes=400)  # K=400 > D=384: linear heads go through the basis
    explainer = CDAMExplainer(model)
    images = images_for(model, batch=2)
    concept = Concept("c", torch.randn(model.num_features, generator=torch.Generator().manual_seed(3)), "cosine")
    result = explainer.explain(images, "all", concepts=[concept])
    check_against_reference(model, images, result, concepts=[concept], slots=[0, 233, 399, 400])


def test_closed_form_refused_where_it_does_not_hold():
    with pytest.raises(
        ValueError, match="closed form does not hold.*DistilledPatch|closed form does not hold.*own forward"
    ):
        CDAMExplainer(make_model("distilled_deit"), method="closed_form")
    with pytest.raises(ValueError, match="global_pool='avg'"):
        CDAMExplainer(make_model("avg_pool_no_cls"), method="closed_form")


def test_forced_autograd_equals_closed_form():
    model = make_model("registers_layerscale")
    images = images_for(model)
    fast = CDAMExplainer(model).explain(images, "topk:3")
    slow = CDAMExplainer(model, method="autograd").explain(images, "topk:3")
    assert relative_error(fast.cdam, slow.cdam) < TOLERANCE
    assert relative_error(fast.attention, slow.attention) < TOLERANCE


def test_bf16_trunk_is_close_and_reports_float32_maps():
    model = make_model("cls_qkv_bias")
    images = images_for(model)
    exact = CDAMExplainer(model).explain(images, "classes:1,2")
    approx = CDAMExplainer(model, precision="bf16").explain(images, "classes:1,2")
    assert approx.cdam.dtype == torch.float32
    assert relative_error(approx.cdam, exact.cdam) < 0.1


def test_cuda_precision_scope_sets_and_restores_the_tf32_flags():
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = matmul.fp32_precision, conv.fp32_precision
    with cuda_fp32_precision(torch.device("cuda"), "ieee"):  # flags only: no GPU needed
        assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
        with cuda_fp32_precision(torch.device("cuda"), "tf32"):
            assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
        assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
    assert (matmul.fp32_precision, conv.fp32_precision) == before
    with cuda_fp32_precision(torch.device("cpu"), "tf32"):  # nothing changes for other devices
        assert (matmul.fp32_precision, conv.fp32_precision) == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family_name", ["registers_layerscale", "distilled_deit"])
def test_cuda_float32_matches_the_reference_and_reduced_precisions_stay_close(family_name):
    model = make_model(family_name)
    images = images_for(model, batch=2)
    cpu = CDAMExplainer(model).explain(images, "all")
    check_against_reference(model, images, cpu, slots=[0, 5])
    model = model.cuda()
    for precision, tolerance in (("float32", TOLERANCE), ("tf32", 0.05), ("bf16", 0.1)):
        result = CDAMExplainer(model, precision=precision).explain(images.cuda(), "all")
        assert result.cdam.device.type == "cuda" and result.cdam.dtype == torch.float32
        assert relative_error(result.cdam.cpu(), cpu.cdam) < tolerance, precision


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family_name", ["cls_qkv_bias", "avg_pool_no_cls"])
def test_cuda_smooth_chunks_sized_to_free_memory_match_small_chunks(family_name):
    model = make_model(family_name).cuda()
    images = images_for(model, batch=4).cuda()
    keys = ["a", "b", "c", "d"]
    config = VariantConfig("smooth", n_samples=50, seed=1)
    sized = CDAMExplainer(model)
    assert sized.variant_chunks(4, model.patch_embed.num_patches + model.num_prefix_tokens, config) == (
        4,
        50,
    )  # a tiny model: one chunk
    one_chunk = sized.explain(images, "classes:1,2", keys=keys, variant=config).cdam
    small_chunks = CDAMExplainer(model, max_rows=3).explain(images, "classes:1,2", keys=keys, variant=config).cdam
    assert relative_error(one_chunk, small_chunks) < 1e-5
    bf16_copies = CDAMExplainer(model, precision="bf16").explain(images, "classes:1,2", keys=keys, variant=config)
    assert bf16_copies.cdam.dtype == torch.float32 and relative_error(bf16_copies.cdam, one_chunk) < 0.1


@pytest.fixture(scope="module")
def explainer():
    return CDAMExplainer(make_model("cls_qkv_bias"), class_names=[f"c{i}" for i in range(11)] + ["zebra"])


class TestBadInput:
    def test_image_size_not_matching(self, explainer):
        with pytest.raises(
            ValueError, match=r"image size 60x64 does not match the model's input size 64x64 \(patch grid 4x4\)"
        ):
            explainer.explain(torch.randn(1, 3, 60, 64))

    def test_dynamic_size_needs_patch_multiple(self):
        model = timm.create_model(
            "vit_small_patch16_224", img_size=64, depth=2, num_classes=3, dynamic_img_size=True
        ).eval()
        explainer = CDAMExplainer(model)
        assert explainer.explain(torch.randn(1, 3, 48, 80)).cdam.shape == (1, 1, 3, 5)
        with pytest.raises(ValueError, match="not a multiple of the patch size 16x16"):
            explainer.explain(torch.randn(1, 3, 50, 64))

    def test_class_out_of_range(self, explainer):
        images = torch.randn(1, 3, 64, 64)
        with pytest.raises(ValueError, match="class index 12 is out of range: the model has 12 classes"):
            explainer.explain(images, [12])
        with pytest.raises(ValueError, match="class index 40 is out of range"):
            explainer.explain(images, "classes:3,40")
        with pytest.raises(ValueError, match="class index -1 is out of range"):
            explainer.explain(images, "label", labels=[-1])

    def test_unknown_class_name_and_name_lookup(self, explainer):
        images = torch.randn(1, 3, 64, 64)
        with pytest.raises(ValueError, match="unknown class name 'zebro'; did you mean 'zebra'"):
            explainer.explain(images, "classes:zebro")
        assert explainer.explain(images, "classes:zebra,c3").target_class.tolist() == [[11, 3]]

    def test_bad_target_specs(self, explainer):
        images = torch.randn(1, 3, 64, 64)
        for spec, message in [("topk:0", "positive integer"), ("best", "expected topk:K"), ("topk:13", "exceeds")]:
            with pytest.raises(ValueError, match=message):
                explainer.explain(images, spec)
        with pytest.raises(ValueError, match="need labels"):
            explainer.explain(images, "label")

    def test_non_vit_and_wrong_images(self, explainer):
        with pytest.raises(ValueError, match="not a timm VisionTransformer"):
            CDAMExplainer(timm.create_model("resnet18", num_classes=3))
        with pytest.raises(ValueError, match="ParallelThingsBlock without norm1"):
            CDAMExplainer(timm.create_model("vit_small_patch16_18x2_224", img_size=32, depth=2, num_classes=3))
        with pytest.raises(ValueError, match="float tensor"):
            explainer.explain(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
        with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
            explainer.explain(torch.zeros(3, 64, 64))
        with pytest.raises(ValueError, match="concept 'v' has 5 dims"):
            explainer.explain(torch.randn(1, 3, 64, 64), concepts=[Concept("v", torch.ones(5))])


# -- reference helpers --------------------------------------------------------------------------


def score_for(result, b: int, slot: int, concepts):
    """The scalar score of one slot as a function of (logits, pre_logits), as the reference takes it."""
    target = result.target_class[b, slot].item()
    if target >= 0:
        return lambda logits, _pre: logits[target]
    concept = concepts[slot - (result.target_class[b] >= 0).sum().item()]
    if concept.similarity == "dot":
        return lambda _logits, pre: pre @ concept.vector
    return lambda _logits, pre: torch.nn.functional.cosine_similarity(pre, concept.vector, dim=0)


def check_against_reference(model, images, result, concepts=(), slots=None):
    slots = range(result.cdam.shape[1]) if slots is None else slots
    for b in range(images.shape[0]):
        for slot in slots:
            expected = reference_cdam(model, images[b], score_for(result, b, slot, concepts))
            assert relative_error(result.cdam[b, slot].flatten(), expected) < TOLERANCE, (b, slot)


class altered_model:
    """The model with its last block's input replaced by ``factor * X + noise`` (for the variant reference)."""

    def __init__(self, model, factor: float, noise: torch.Tensor):
        self.model, self.factor, self.noise = model, factor, noise

    def __getattr__(self, name):
        return getattr(self.model, name)

    def forward_features(self, images):
        handle = self.model.blocks[-1].register_forward_pre_hook(
            lambda _m, args: (self.factor * args[0] + self.noise[None],)
        )
        try:
            return self.model.forward_features(images)
        finally:
            handle.remove()
