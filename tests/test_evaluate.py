"""``cdam evaluate``: the measures against direct computations, TAM / deletion / input x gradient against
literal one-at-a-time computations on tiny models, and the command on the demo run, locally and on S3."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import zarr
from helpers import S3Proxy, upload_folder
from scipy.stats import spearmanr

from cdam_worker.evaluate import metrics
from cdam_worker.evaluate.attention import (
    attention_rollout,
    chefer_relevance,
    gradient_weighted_attention,
    traced_forward,
)
from cdam_worker.evaluate.perturb import (
    deletion_curves,
    input_x_gradient,
    integrated_gradients,
    smoothgrad,
    token_ablation,
)
from cdam_worker.reading import open_run
from jobs.cli import main

TINY_MODELS = {
    "cls": dict(global_pool="token"),
    "avg-pool": dict(global_pool="avg", class_token=False),
    "registers": dict(reg_tokens=2),
}


def tiny_model(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5, **kwargs
    ).eval()


def without_tokens(model, image: torch.Tensor, removed: list[int]) -> torch.Tensor:
    """Logits of one image with the patch tokens ``removed`` dropped after the positional embedding, literally."""
    with torch.no_grad():
        tokens = model._pos_embed(model.patch_embed(image[None]))
        prefix = model.num_prefix_tokens
        kept = [i for i in range(tokens.shape[1]) if i < prefix or i - prefix not in removed]
        return model.forward_head(model.norm(model.blocks(model.norm_pre(tokens[:, kept]))))[0]


# -- the measures ----------------------------------------------------------------------------------


def test_measures_against_direct_computations():
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(6, 40)) * rng.random((6, 1))
    maps[1, :30] = 0.0
    for measured, row in zip(metrics.compactness(maps), maps):
        assert measured == sum(abs(s) < 0.05 * max(abs(row)) for s in row) / len(row)
    for measured, row in zip(metrics.gini(maps), np.abs(maps)):  # mean absolute difference / (2 * mean)
        assert measured == pytest.approx(
            sum(abs(a - b) for a in row for b in row) / (2 * len(row) ** 2 * row.mean()), rel=1e-12
        )
    assert np.isnan(metrics.compactness(np.zeros((1, 5)))).all() and np.isnan(metrics.gini(np.zeros((1, 5)))).all()
    tied = rng.integers(0, 4, size=(6, 40)).astype(float)  # ties get mean ranks, as scipy's
    for measured, a, b in zip(metrics.spearman(maps, tied), maps, tied):
        assert measured == pytest.approx(spearmanr(a, b).statistic, rel=1e-12)
    assert metrics.cosine(maps, 3 * maps) == pytest.approx(np.ones(6))
    removed = metrics.deletion_steps(40, 4)
    assert removed.tolist() == [0, 10, 20, 30, 40]
    orders = metrics.deletion_orders(maps)
    assert (np.take_along_axis(maps, orders[:, 0], 1)[:, :-1] >= np.take_along_axis(maps, orders[:, 0], 1)[:, 1:]).all()
    assert (np.take_along_axis(maps, orders[:, 1], 1)[:, :-1] <= np.take_along_axis(maps, orders[:, 1], 1)[:, 1:]).all()
    drops = np.stack(
        [np.stack([removed * 0.1, removed * 0.0])], axis=0
    )  # most-first rises linearly to 4, least-first stays 0
    assert metrics.deletion_gap(drops, removed) == pytest.approx([2.0])


def test_ssim_curve_areas_and_bootstrap_intervals_against_direct_computations():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(3, 8, 9)), rng.normal(size=(3, 8, 9))
    b[1] = 2 * a[1] + 1  # the same map after min-max scaling
    for measured, x, y in zip(metrics.ssim(a, b), a, b):
        x, y = (x - x.min()) / np.ptp(x), (y - y.min()) / np.ptp(y)
        values = []
        for i in range(8 - 6):
            for j in range(9 - 6):
                u, v = x[i : i + 7, j : j + 7].ravel(), y[i : i + 7, j : j + 7].ravel()
                cov = np.cov(u, v)  # sample (co)variances, as scikit-image's default
                values.append(
                    (2 * u.mean() * v.mean() + 1e-4)
                    * (2 * cov[0, 1] + 9e-4)
                    / ((u.mean() ** 2 + v.mean() ** 2 + 1e-4) * (cov[0, 0] + cov[1, 1] + 9e-4))
                )
        assert measured == pytest.approx(np.mean(values), rel=1e-10)
    assert metrics.ssim(a, b)[1] == pytest.approx(1.0)
    assert np.isnan(metrics.ssim(np.ones((1, 4, 4)), a[:1, :4, :4])).all()
    assert metrics.ssim(a[:, :3, :3], b[:, :3, :3]).shape == (3,)  # the window shrinks to the grid (3 x 3)

    removed = metrics.deletion_steps(40, 4)
    assert metrics.curve_area(
        np.array([[1.0, 1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 2.0, 3.0, 4.0]]), removed
    ) == pytest.approx([1.0, 2.0])
    values = rng.normal(size=50)
    low, high = metrics.bootstrap_interval(values, 2000, seed=3)
    means = [values[np.random.default_rng(3).integers(0, 50, size=(2000, 50))[r]].mean() for r in range(2000)]
    assert (low, high) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])))
    assert low < values.mean() < high
    assert all(np.isnan(metrics.bootstrap_interval(values[:1])))


# -- TAM, deletion, input x gradient against literal computations -------------------------------------


@pytest.mark.parametrize("kind", sorted(TINY_MODELS))
def test_token_ablation_equals_removing_one_token_at_a_time(kind):
    model = tiny_model(**TINY_MODELS[kind])
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    logits, drops = token_ablation(model, images, max_rows=7)  # rows of removals split over several passes
    assert drops.shape == (3, 5, 16)
    for b in range(3):
        assert torch.allclose(logits[b], model(images[b : b + 1])[0], atol=1e-6)
        literal = torch.stack([logits[b] - without_tokens(model, images[b], [i]) for i in range(16)], dim=1)
        assert torch.allclose(drops[b], literal, atol=1e-5, rtol=1e-4)


def test_deletion_curves_and_input_x_gradient_equal_literal_computations():
    model = tiny_model(**TINY_MODELS["registers"])
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    orders = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(s)) for s in range(4)]).view(
        2, 2, 16
    )
    removed = torch.tensor([0, 5, 16])
    classes = torch.tensor([3, 1])
    logits, probabilities = deletion_curves(model, images, classes, orders, removed, max_rows=3)
    for b in range(2):
        for r in range(2):
            for s, k in enumerate(removed.tolist()):
                literal = without_tokens(model, images[b], orders[b, r, :k].tolist())
                assert logits[b, r, s].item() == pytest.approx(literal[classes[b]].item(), abs=1e-5)
                assert probabilities[b, r, s].item() == pytest.approx(literal.softmax(0)[classes[b]].item(), abs=1e-6)

    wanted = torch.tensor([[0, 4], [2, 2]])
    maps = input_x_gradient(model, images, wanted, (8, 8), (4, 4), max_rows=3)
    for b in range(2):
        for k in range(2):
            x = images[b : b + 1].clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(model(x)[0, wanted[b, k]], x)
            assert torch.allclose(maps[b, k], per_token_literal((x * grad).detach()[0]), atol=1e-6, rtol=1e-4)


def per_token_literal(pixels: torch.Tensor) -> torch.Tensor:
    """(3, 32, 32) pixel scores summed over channels and each 8 x 8 token: (4, 4)."""
    summed = pixels.sum(0)
    return torch.tensor([[summed[8 * y : 8 * y + 8, 8 * c : 8 * c + 8].sum() for c in range(4)] for y in range(4)])


def test_integrated_gradients_and_smoothgrad_equal_their_definitions():
    model = tiny_model(**TINY_MODELS["cls"])
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    wanted = torch.tensor([[1, 3], [0, 0]])
    steps, draws = 5, 3
    noise = 0.3 * torch.randn(2, draws, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    ig = integrated_gradients(model, images, wanted, (8, 8), (4, 4), steps, max_rows=4)
    sg = smoothgrad(model, images, wanted, (8, 8), (4, 4), noise, max_rows=4)
    for b in range(2):
        for k in range(2):

            def gradient_at(point, target=int(wanted[b, k])):
                x = point[None].clone().requires_grad_(True)
                return torch.autograd.grad(model(x)[0, target], x)[0][0]

            path = (
                sum(gradient_at((s + 0.5) / steps * images[b]) for s in range(steps)) / steps
            )  # zero baseline, midpoints
            assert torch.allclose(ig[b, k], per_token_literal(images[b] * path), atol=1e-5, rtol=1e-4)
            smoothed = sum(gradient_at(images[b] + noise[b, j]) for j in range(draws)) / draws
            assert torch.allclose(sg[b, k], per_token_literal(images[b] * smoothed), atol=1e-5, rtol=1e-4)


# -- the attention estimators against literal implementations on timm's own forward pass ----------------------


def attention_by_hooks(model, image: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """timm's own (unfused) forward of one image, keeping each block's attention probabilities with their gradient."""
    kept = []

    def keep(module, inputs, output) -> None:
        output.retain_grad()
        kept.append(output)

    handles = []
    for block in model.blocks:
        block.attn.fused_attn = False
        handles.append(block.attn.attn_drop.register_forward_hook(keep))
    try:
        logits = model(image[None])
    finally:
        for handle in handles:
            handle.remove()
        for block in model.blocks:
            block.attn.fused_attn = True
    return logits[0], kept


def cls_row(model, joint: torch.Tensor) -> torch.Tensor:
    prefix = model.num_prefix_tokens
    return joint[0, prefix:] if model.global_pool == "token" else joint[prefix:, prefix:].mean(0)


@pytest.mark.parametrize("kind", sorted(TINY_MODELS))
def test_rollout_and_gradient_weighted_attention_equal_their_definitions(kind):
    model = tiny_model(**TINY_MODELS[kind])
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    wanted = torch.tensor([[0, 2], [4, 1], [3, 3]])
    logits, _, _ = traced_forward(model, images)
    assert torch.allclose(logits, model(images), atol=1e-5)
    rollout = attention_rollout(model, images, wanted, max_rows=2)
    weighted = gradient_weighted_attention(model, images, wanted, max_rows=4)
    for b in range(3):
        _, attentions = attention_by_hooks(model, images[b])
        length = attentions[0].shape[-1]
        joint = torch.eye(length)
        for attention in attentions:  # Abnar and Zuidema: (I + mean_h A), rows normalised, first block rightmost
            step = torch.eye(length) + attention[0].mean(0)
            joint = (step / step.sum(1, keepdim=True)) @ joint
        for k in range(2):
            assert torch.allclose(rollout[b, k], cls_row(model, joint), atol=1e-5)
            logits, attentions = attention_by_hooks(model, images[b])
            logits[wanted[b, k]].backward()
            relevance = torch.eye(length)
            for attention in attentions:  # Chefer et al. 2021b: R += mean_h(relu(grad * A)) @ R
                relevance = relevance + (attention.grad[0] * attention[0]).clamp(min=0).mean(0) @ relevance
            assert torch.allclose(weighted[b, k], cls_row(model, relevance.detach()), atol=1e-5, rtol=1e-4)


def safe_divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    den = b.clamp(min=1e-9) + b.clamp(max=1e-9)
    den = den + den.eq(0).type(den.type()) * 1e-9
    return a / den * b.ne(0).type(b.type())


def gradprop(outputs, inputs, grads):
    return torch.autograd.grad(outputs, inputs, grads, retain_graph=True)


def linear_relprop(x: torch.Tensor, weight: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """Chefer et al.'s ``Linear.relprop`` with alpha = 1 (beta = 0), gradients by autograd."""
    pw, nw = weight.clamp(min=0), weight.clamp(max=0)
    px, nx = x.clamp(min=0).requires_grad_(True), x.clamp(max=0).requires_grad_(True)
    z1, z2 = F.linear(px, pw), F.linear(nx, nw)
    share = safe_divide(relevance, z1 + z2)
    return (px * gradprop(z1, px, share)[0] + nx * gradprop(z2, nx, share)[0]).detach()


def einsum_relprop(
    equation: str, a: torch.Tensor, b: torch.Tensor, relevance: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``einsum.relprop`` (RelPropSimple with two inputs)."""
    a, b = a.detach().requires_grad_(True), b.detach().requires_grad_(True)
    z = torch.einsum(equation, a, b)
    ga, gb = gradprop(z, [a, b], safe_divide(relevance, z))
    return (a * ga).detach(), (b * gb).detach()


def add_relprop(a: torch.Tensor, b: torch.Tensor, relevance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``Add.relprop`` (one image: the sums are over everything)."""
    a, b = a.detach().requires_grad_(True), b.detach().requires_grad_(True)
    z = a + b
    ga, gb = gradprop(z, [a, b], safe_divide(relevance, z))
    ra, rb = (a * ga).detach(), (b * gb).detach()
    a_sum, b_sum = ra.sum(), rb.sum()
    a_fact = safe_divide(a_sum.abs(), a_sum.abs() + b_sum.abs()) * relevance.sum()
    b_fact = safe_divide(b_sum.abs(), a_sum.abs() + b_sum.abs()) * relevance.sum()
    return ra * safe_divide(a_fact, ra.sum()), rb * safe_divide(b_fact, rb.sum())


def clone_relprop(x: torch.Tensor, relevances: list[torch.Tensor]) -> torch.Tensor:
    """``Clone.relprop``."""
    x = x.detach().requires_grad_(True)
    copies = [x * 1 for _ in relevances]
    (grad,) = gradprop(copies, x, [safe_divide(r, x) for r in relevances])
    return (x * grad).detach()


def chefer_reference(model, image: torch.Tensor, wanted: int) -> torch.Tensor:
    """Chefer et al. (CVPR 2021) "transformer_attribution" of one image, following the authors' ViT_LRP and
    ViT_explanation_generator literally, on activations taken from timm's own forward pass by hooks."""
    seen: dict[str, torch.Tensor] = {}

    def record(name: str, what: str = "output"):
        def hook(module, inputs, output) -> None:
            seen[name] = (inputs[0] if what == "input" else output).detach()

        return hook

    handles = [
        model.norm.register_forward_hook(record("normed")),
        model.head.register_forward_hook(record("head_in", "input")),
    ]
    for i, block in enumerate(model.blocks):
        handles += [
            block.register_forward_hook(record(f"{i}.x_in", "input")),
            block.attn.qkv.register_forward_hook(record(f"{i}.qkv")),
            block.attn.qkv.register_forward_hook(record(f"{i}.normed1", "input")),
            block.attn.proj.register_forward_hook(record(f"{i}.heads", "input")),
            block.ls1.register_forward_hook(record(f"{i}.attended")),
            block.mlp.fc1.register_forward_hook(record(f"{i}.normed2", "input")),
            block.mlp.fc2.register_forward_hook(record(f"{i}.hidden", "input")),
            block.ls2.register_forward_hook(record(f"{i}.mlp_out")),
        ]
    try:
        logits, attentions = attention_by_hooks(model, image)
    finally:
        for handle in handles:
            handle.remove()
    logits[wanted].backward()
    one_hot = torch.zeros(1, logits.shape[0])
    one_hot[0, wanted] = 1
    cam = linear_relprop(seen["head_in"], model.head.weight, one_hot)  # head
    normed = seen["normed"]
    tokens = torch.zeros_like(normed)  # pool (IndexSelect of the class token)
    tokens[:, 0] = normed[:, 0] * safe_divide(cam, normed[:, 0])
    cam = tokens  # norm: passed through
    cams = [None] * len(model.blocks)
    for i in reversed(range(len(model.blocks))):
        block, heads = model.blocks[i], model.blocks[i].attn.num_heads
        x_in, attended, mlp_out = seen[f"{i}.x_in"], seen[f"{i}.attended"], seen[f"{i}.mlp_out"]
        x_mid = x_in + attended
        cam1, cam2 = add_relprop(x_mid, mlp_out, cam)
        cam2 = linear_relprop(seen[f"{i}.hidden"], block.mlp.fc2.weight, cam2)
        cam2 = linear_relprop(seen[f"{i}.normed2"], block.mlp.fc1.weight, cam2)  # GELU and norm2: passed through
        cam = clone_relprop(x_mid, [cam1, cam2])
        cam1, cam2 = add_relprop(x_in, attended, cam)
        cam2 = linear_relprop(seen[f"{i}.heads"], block.attn.proj.weight, cam2)
        cam2 = cam2.view(1, -1, heads, cam2.shape[-1] // heads).permute(0, 2, 1, 3)  # b n (h d) -> b h n d
        q, k, v = seen[f"{i}.qkv"].view(1, -1, 3, heads, cam2.shape[-1]).permute(2, 0, 3, 1, 4)
        attention = attentions[i].detach()
        cam_attention, cam_v = einsum_relprop("bhij,bhjd->bhid", attention, v, cam2)
        cam_attention, cam_v = cam_attention / 2, cam_v / 2
        cams[i] = cam_attention
        cam_q, cam_k = einsum_relprop("bhid,bhjd->bhij", q, k, cam_attention)  # softmax: passed through
        cam_qkv = (
            torch.stack([cam_q / 2, cam_k / 2, cam_v]).permute(1, 3, 0, 2, 4).reshape(1, q.shape[2], -1)
        )  # qkv b h n d -> b n (qkv h d)
        cam2 = linear_relprop(seen[f"{i}.normed1"], block.attn.qkv.weight, cam_qkv)
        cam = clone_relprop(x_in, [cam1, cam2])
    length = attentions[0].shape[-1]
    joint = None
    for i in range(
        len(model.blocks)
    ):  # compute_rollout_attention: (I + mean_h(relu(grad * cam))), products without normalising
        step = (attentions[i].grad[0] * cams[i][0]).clamp(min=0).mean(0) + torch.eye(length)
        joint = step if joint is None else step @ joint
    return joint[0, model.num_prefix_tokens :]


@pytest.mark.parametrize("kind", ["cls", "registers"])
def test_relevance_propagation_equals_the_authors_rules(kind):
    model = tiny_model(**TINY_MODELS[kind])
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    wanted = torch.tensor([[2, 0], [1, 4]])
    maps = chefer_relevance(model, images, wanted, max_rows=3)
    for b in range(2):
        for k in range(2):
            literal = chefer_reference(model, images[b], int(wanted[b, k]))
            assert literal.abs().max() > 0
            assert torch.allclose(maps[b, k], literal, atol=1e-6, rtol=1e-4), (maps[b, k], literal)


# -- the command on the demo run ---------------------------------------------------------------------


def copy_run(demo_run: str, folder: Path) -> str:
    shutil.copytree(demo_run, folder / "run")
    return str(folder / "run")


@pytest.fixture(scope="module")
def evaluated(demo_run, tmp_path_factory) -> tuple[str, str]:
    """The demo run evaluated with its model (from the manifest): (run folder, what the command printed)."""
    run_dir = copy_run(demo_run, tmp_path_factory.mktemp("evaluate"))
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert (
            main(
                [
                    "evaluate",
                    run_dir,
                    "--sample",
                    "24",
                    "--steps",
                    "4",
                    "--seed",
                    "3",
                    "--methods",
                    "all",
                    "--ig-steps",
                    "4",
                    "--smoothgrad-samples",
                    "4",
                    "--sanity",
                    "6",
                    "--robustness",
                    "4",
                    "--perturbations",
                    "3",
                ]
            )
            == 0
        )
    return run_dir, printed.getvalue()


FOUR_METHODS_ONLY = ["--methods", "cdam,tam,am,ixg", "--sanity", "0", "--robustness", "0"]
"""`cdam evaluate` flags: the faithfulness curves of cdam, tam, am and ixg, without the sanity and robustness checks."""
ALL_METHODS = [
    "CDAM",
    "TAM",
    "AM",
    "Input x gradient",
    "Attention rollout",
    "Gradient-weighted attention",
    "Relevance propagation",
    "Integrated Gradients",
    "SmoothGrad",
]


def test_evaluate_on_the_demo_run(evaluated):
    run_dir, printed = evaluated
    run = open_run(run_dir)
    summary = run.table("evaluation/summary.parquet").to_pylist()
    images = run.table("evaluation/images.parquet")
    assert [row["method"] for row in summary] == ALL_METHODS
    assert [row["n_images"] for row in summary] == [24] * len(ALL_METHODS)
    assert all(row["method"] in printed for row in summary) and "compactness" in printed and "95% interval" in printed
    assert "not implemented" not in printed

    # compactness against a direct computation on the stored arrays (the demo stored every class: slot = class)
    cdam = images.filter(images.column("method").to_numpy(zero_copy_only=False) == "CDAM")
    rows, pred = cdam.column("row").to_numpy(), cdam.column("class").to_numpy()
    stored = run.read_rows("cdam", rows)[np.arange(len(rows)), pred].reshape(len(rows), -1)
    direct = [(np.abs(s) < 0.05 * np.abs(s).max()).mean() for s in stored]
    assert np.allclose(cdam.column("compactness").to_numpy(), direct)
    assert summary[0]["compactness"] == pytest.approx(np.mean(direct))
    attention = run.read_rows("attention", rows).mean(axis=1).reshape(len(rows), -1)
    am = images.filter(images.column("method").to_numpy(zero_copy_only=False) == "AM")
    assert np.allclose(
        am.column("compactness").to_numpy(), [(np.abs(a) < 0.05 * np.abs(a).max()).mean() for a in attention]
    )

    by_method = {row["method"]: row for row in summary}
    assert by_method["AM"]["class_similarity"] == pytest.approx(1.0, abs=1e-6)  # one map for every class
    assert by_method["TAM"]["correctness_spearman"] == pytest.approx(1.0)
    curves = images.to_pylist()
    assert all(r["deletion_most_first"][0] == 0 and r["deletion_least_first"][0] == 0 for r in curves)
    assert all(r["deletion_most_first"][-1] == pytest.approx(r["deletion_least_first"][-1], abs=1e-4) for r in curves)
    gaps = [
        np.trapezoid(np.subtract(r["deletion_most_first"], r["deletion_least_first"]), np.linspace(0, 1, 5))
        for r in curves
    ]
    assert np.allclose(gaps, images.column("deletion_auc_gap").to_numpy(), atol=1e-5)

    # insertion: the least-relevant-first deletion read backwards; its ends are the same for every method of an image
    stored_logits = run.read_rows("logits", np.array([r["row"] for r in curves]))
    for r, logits in zip(curves, stored_logits):
        inserted = np.asarray(r["insertion_most_first"])
        assert inserted[-1] == pytest.approx(logits[r["class"]], abs=1e-3)  # every token back: the full image
        assert np.allclose(inserted, inserted[-1] - np.asarray(r["deletion_least_first"])[::-1], atol=1e-4)
        assert r["insertion_auc"] == pytest.approx(np.trapezoid(inserted, np.linspace(0, 1, 5)), abs=1e-5)
        deleted = inserted[-1] - np.asarray(r["deletion_most_first"])
        assert r["deletion_auc"] == pytest.approx(np.trapezoid(deleted, np.linspace(0, 1, 5)), abs=1e-5)
        assert r["insertion_auc_prob"] == pytest.approx(
            np.trapezoid(r["insertion_prob_most_first"], np.linspace(0, 1, 5)), abs=1e-6
        )
        assert all(0 <= v <= 1 for v in r["deletion_prob_most_first"] + r["insertion_prob_most_first"])
    starts = {}
    for r in curves:
        starts.setdefault(r["key"], set()).add(round(r["insertion_most_first"][0], 4))  # the prefix tokens alone
    assert all(len(values) == 1 for values in starts.values())

    for row in summary:  # every value with its interval and count
        for measure in ("compactness", "deletion_auc", "insertion_auc_prob", "sanity_spearman_head", "max_sensitivity"):
            assert row[f"{measure}_low"] <= row[measure] <= row[f"{measure}_high"], (row["method"], measure)
        assert row["compactness_n"] == 24 and row["sanity_spearman_head_n"] == 6
    assert (
        by_method["TAM"]["deletion_auc_gap"] > by_method["AM"]["deletion_auc_gap"] - 5
    )  # a sanity bound, not a ranking


def test_sanity_checks_on_the_demo_run(evaluated):
    """Randomising the head leaves the attention map as it is (it does not depend on the head), and changes the
    maps of the gradient methods; the cascade to every block changes every map."""
    run = open_run(evaluated[0])
    sanity = run.table("evaluation/sanity.parquet")
    rows = {(r["method"], r["randomized"]): r for r in sanity.to_pylist()}
    randomisations = [
        "head",
        "last_block",
        "cascade_1",
        "cascade_2",
        "cascade_3",
        "labels",
    ]  # the demo ViT has 3 blocks, and labels
    assert sanity.column_names[:5] == ["method", "randomized", "spearman", "ssim", "n_images"]
    assert sorted(rows) == sorted((m, r) for m in ALL_METHODS for r in randomisations)
    assert all(r["n_images"] == 6 for r in rows.values())
    for randomized in ("head", "labels"):
        assert rows[("AM", randomized)]["spearman"] == pytest.approx(1.0) and rows[("AM", randomized)][
            "ssim"
        ] == pytest.approx(1.0)
        assert rows[("Attention rollout", randomized)]["spearman"] == pytest.approx(1.0)
    assert rows[("AM", "last_block")]["spearman"] < 0.9
    for method in ("CDAM", "Input x gradient", "Relevance propagation", "Gradient-weighted attention"):
        assert rows[(method, "cascade_3")]["spearman"] < 0.9, method
    summary = {r["method"]: r for r in run.table("evaluation/summary.parquet").to_pylist()}
    assert summary["AM"]["sanity_spearman_head"] == pytest.approx(1.0)
    assert summary["CDAM"]["sanity_spearman_cascade"] == pytest.approx(rows[("CDAM", "cascade_3")]["spearman"])
    assert summary["CDAM"]["sanity_ssim_labels"] == pytest.approx(rows[("CDAM", "labels")]["ssim"])
    for method in ALL_METHODS:  # robustness: measured on the 4 images, a relative change of the map
        assert summary[method]["fgsm_change_n"] == 4 and summary[method]["fgsm_change"] >= 0
        assert 0 <= summary[method]["max_sensitivity"] < 10


def test_a_smooth_run_is_compared_with_vanilla_cdam_from_the_engine(demo_run, tmp_path):
    """A run whose attributes say Smooth CDAM (here the demo's vanilla maps, relabelled): its stored maps are
    measured as 'Smooth CDAM', and 'CDAM' comes from the engine, which gives those same vanilla maps again."""
    run_dir = copy_run(demo_run, tmp_path)
    group = zarr.open_group(Path(run_dir, "cdam.zarr"), mode="r+", zarr_format=3)
    group.attrs["variant"] = {"variant": "smooth", "n_samples": 4, "noise_level": 0.05, "seed": 0}
    assert main(["evaluate", run_dir, "--sample", "6", "--steps", "2", *FOUR_METHODS_ONLY]) == 0
    images = open_run(run_dir).table("evaluation/images.parquet")
    by_method = {
        m: images.filter(images.column("method").to_numpy(zero_copy_only=False) == m) for m in ("CDAM", "Smooth CDAM")
    }
    assert [row["method"] for row in open_run(run_dir).table("evaluation/summary.parquet").to_pylist()] == [
        "CDAM",
        "Smooth CDAM",
        "TAM",
        "AM",
        "Input x gradient",
    ]
    for measure in ("gini", "class_similarity", "correctness_spearman"):
        assert np.allclose(
            by_method["CDAM"].column(measure).to_numpy(), by_method["Smooth CDAM"].column(measure).to_numpy(), atol=1e-5
        )


def test_evaluate_without_a_model_measures_the_stored_maps(evaluated, demo_run, tmp_path, capsys):
    run_dir = copy_run(demo_run, tmp_path)
    assert main(["evaluate", run_dir, "--sample", "24", "--steps", "4", "--seed", "3", "--no-model"]) == 0
    err = capsys.readouterr().err
    assert (
        "note: measured without the model: the stored maps' (CDAM, AM) compactness, Gini and class sensitivity; skipped: "
        in err
    )
    assert "give the model flags" not in err and not Path(run_dir, "evaluation/sanity.parquet").exists()
    summary = {row["method"]: row for row in open_run(run_dir).table("evaluation/summary.parquet").to_pylist()}
    with_model = {row["method"]: row for row in open_run(evaluated[0]).table("evaluation/summary.parquet").to_pylist()}
    assert list(summary) == ["CDAM", "AM"]
    for method in summary:
        assert summary[method]["compactness"] == with_model[method]["compactness"]
        assert summary[method]["class_similarity"] == with_model[method]["class_similarity"]
        assert np.isnan(summary[method]["correctness_spearman"]) and np.isnan(summary[method]["deletion_auc_gap"])


def test_evaluate_skips_what_the_run_lacks_and_says_why(demo_run, tmp_path, capsys):
    """A shard without completion marker, an image whose arrays read NaN, and a checkpoint no longer where the
    manifest says: each is a note, and the rest is evaluated."""
    run_dir = copy_run(demo_run, tmp_path)
    Path(run_dir, "markers/000001.json").unlink()
    manifest = json.loads(Path(run_dir, "manifest.json").read_text())
    manifest["model_source"]["checkpoint"] = str(tmp_path / "moved.pt")
    Path(run_dir, "manifest.json").write_text(json.dumps(manifest))
    run = open_run(run_dir)
    key, row = run.index.column("key")[7].as_py(), int(run.index.column("row")[7].as_py())
    zarr.open_group(Path(run_dir, "cdam.zarr"), mode="r+", zarr_format=3)["embedding"][row] = np.nan
    assert main(["evaluate", run_dir, "--sample", "1000"]) == 0
    err = capsys.readouterr().err
    assert "note: shard test-000001: no completion marker (still running, failed or cut off): not read" in err
    assert f"note: image {key} (row {row}): its arrays read NaN (not written): not evaluated" in err
    assert f"note: cannot load the run's model: checkpoint file not found: {tmp_path / 'moved.pt'}" in err
    summary = open_run(run_dir).table("evaluation/summary.parquet").to_pylist()
    assert [(r["method"], r["n_images"]) for r in summary] == [("CDAM", 191), ("AM", 191)]


def test_evaluate_on_s3_retries_transient_faults(demo_run, s3_client, s3_bucket, s3_server, tmp_path, monkeypatch):
    url = upload_folder(s3_client, demo_run, s3_bucket, "demo")
    args = [
        "--sample",
        "8",
        "--steps",
        "2",
        "--seed",
        "5",
        *FOUR_METHODS_ONLY,
    ]
    with S3Proxy(s3_server, fail_every=4, fault=("503", "drop")) as flaky:
        monkeypatch.setenv("AWS_ENDPOINT_URL", flaky.url)
        assert main(["evaluate", url, *args]) == 0
    monkeypatch.undo()
    assert {fault for _, _, fault in flaky.faulted} == {"503", "drop"}
    local = copy_run(demo_run, tmp_path)
    assert main(["evaluate", local, *args]) == 0
    on_s3 = open_run(url).table("evaluation/summary.parquet")
    assert on_s3.num_rows == 4 and on_s3.to_pandas().equals(
        open_run(local).table("evaluation/summary.parquet").to_pandas()
    )  # NaN (no checks) == NaN


def test_a_second_evaluate_is_refused(demo_run, tmp_path, capsys):
    run_dir = copy_run(demo_run, tmp_path)
    with open_run(run_dir).exclusive("evaluate"):
        assert main(["evaluate", run_dir, "--sample", "4", "--no-model"]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .startswith(f"cdam evaluate: error: output {run_dir} is in use by another cdam job")
    )
    assert not Path(run_dir, "evaluation").exists()


def test_bad_flags_are_one_line_errors(demo_run, capsys):
    assert main(["evaluate", demo_run, "--sample", "0"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "cdam evaluate: error: --sample, --steps and --batch-size must be at least 1 (got 0, 10, 16)"
    )
    assert main(["evaluate", demo_run, "--methods", "cdam,lpr"]) == 2
    assert capsys.readouterr().err.strip() == (
        "cdam evaluate: error: --methods: unknown method 'lpr' "
        "(known: cdam, tam, am, ixg, rollout, gradattn, lrp, ig, smoothgrad, cheap, all)"
    )
    assert main(["evaluate", demo_run, "--device", "tpu"]) == 2
    assert capsys.readouterr().err.strip().startswith("cdam evaluate: error: --device 'tpu': ")
    assert main(["evaluate", demo_run, "--checkpoint", "/nowhere/model.pt"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "cdam evaluate: error: cannot load the run's model: checkpoint file not found: /nowhere/model.pt; give the model flags (--model, --checkpoint, ...)"
    )
