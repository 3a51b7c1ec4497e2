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
import zarr
from scipy.stats import spearmanr

from cdam_worker.evaluate import metrics
from cdam_worker.evaluate.perturb import deletion_drops, input_x_gradient, token_ablation
from cdam_worker.reading import open_run
from helpers import S3Proxy, upload_folder
from jobs.cli import main

TINY_MODELS = {
    "cls": dict(global_pool="token"),
    "avg-pool": dict(global_pool="avg", class_token=False),
    "registers": dict(reg_tokens=2),
}


def tiny_model(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5, **kwargs).eval()


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
        assert measured == pytest.approx(sum(abs(a - b) for a in row for b in row) / (2 * len(row) ** 2 * row.mean()), rel=1e-12)
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
    drops = np.stack([np.stack([removed * 0.1, removed * 0.0])], axis=0)  # most-first rises linearly to 4, least-first stays 0
    assert metrics.deletion_gap(drops, removed) == pytest.approx([2.0])


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
    orders = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(s)) for s in range(4)]).view(2, 2, 16)
    removed = torch.tensor([0, 5, 16])
    classes = torch.tensor([3, 1])
    drops = deletion_drops(model, images, classes, orders, removed, max_rows=3)
    for b in range(2):
        score = model(images[b : b + 1])[0, classes[b]]
        for r in range(2):
            for s, k in enumerate(removed.tolist()):
                literal = score - without_tokens(model, images[b], orders[b, r, :k].tolist())[classes[b]]
                assert drops[b, r, s].item() == pytest.approx(literal.item(), abs=1e-5)

    wanted = torch.tensor([[0, 4], [2, 2]])
    maps = input_x_gradient(model, images, wanted, (8, 8), (4, 4), max_rows=3)
    for b in range(2):
        for k in range(2):
            x = images[b : b + 1].clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(model(x)[0, wanted[b, k]], x)
            pixels = (x * grad).detach()[0].sum(0)
            literal = torch.tensor([[pixels[8 * y : 8 * y + 8, 8 * c : 8 * c + 8].sum() for c in range(4)] for y in range(4)])
            assert torch.allclose(maps[b, k], literal, atol=1e-6, rtol=1e-4)


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
        assert main(["evaluate", run_dir, "--sample", "24", "--steps", "4", "--seed", "3"]) == 0
    return run_dir, printed.getvalue()


def test_evaluate_on_the_demo_run(evaluated):
    run_dir, printed = evaluated
    run = open_run(run_dir)
    summary = run.table("evaluation/summary.parquet").to_pylist()
    images = run.table("evaluation/images.parquet")
    assert [row["method"] for row in summary] == ["CDAM", "TAM", "AM", "Input x gradient"]
    assert [row["n_images"] for row in summary] == [24] * 4
    assert all(row["method"] in printed for row in summary) and "compactness" in printed

    # compactness against a direct computation on the stored arrays (the demo stored every class: slot = class)
    cdam = images.filter(images.column("method").to_numpy(zero_copy_only=False) == "CDAM")
    rows, pred = cdam.column("row").to_numpy(), cdam.column("class").to_numpy()
    stored = run.read_rows("cdam", rows)[np.arange(len(rows)), pred].reshape(len(rows), -1)
    direct = [(np.abs(s) < 0.05 * np.abs(s).max()).mean() for s in stored]
    assert np.allclose(cdam.column("compactness").to_numpy(), direct)
    assert summary[0]["compactness"] == pytest.approx(np.mean(direct))
    attention = run.read_rows("attention", rows).mean(axis=1).reshape(len(rows), -1)
    am = images.filter(images.column("method").to_numpy(zero_copy_only=False) == "AM")
    assert np.allclose(am.column("compactness").to_numpy(), [(np.abs(a) < 0.05 * np.abs(a).max()).mean() for a in attention])

    by_method = {row["method"]: row for row in summary}
    assert by_method["AM"]["class_similarity"] == pytest.approx(1.0, abs=1e-6)  # one map for every class
    assert by_method["TAM"]["correctness_spearman"] == pytest.approx(1.0)
    curves = images.to_pylist()
    assert all(r["deletion_most_first"][0] == 0 and r["deletion_least_first"][0] == 0 for r in curves)
    assert all(r["deletion_most_first"][-1] == pytest.approx(r["deletion_least_first"][-1], abs=1e-4) for r in curves)
    gaps = [np.trapezoid(np.subtract(r["deletion_most_first"], r["deletion_least_first"]), np.linspace(0, 1, 5)) for r in curves]
    assert np.allclose(gaps, images.column("deletion_auc_gap").to_numpy(), atol=1e-5)


def test_a_smooth_run_is_compared_with_vanilla_cdam_from_the_engine(demo_run, tmp_path):
    """A run whose attributes say Smooth CDAM (here the demo's vanilla maps, relabelled): its stored maps are
    measured as 'Smooth CDAM', and 'CDAM' comes from the engine, which gives those same vanilla maps again."""
    run_dir = copy_run(demo_run, tmp_path)
    group = zarr.open_group(Path(run_dir, "cdam.zarr"), mode="r+", zarr_format=3)
    group.attrs["variant"] = {"variant": "smooth", "n_samples": 4, "noise_level": 0.05, "seed": 0}
    assert main(["evaluate", run_dir, "--sample", "6", "--steps", "2"]) == 0
    images = open_run(run_dir).table("evaluation/images.parquet")
    by_method = {m: images.filter(images.column("method").to_numpy(zero_copy_only=False) == m) for m in ("CDAM", "Smooth CDAM")}
    assert [row["method"] for row in open_run(run_dir).table("evaluation/summary.parquet").to_pylist()] == ["CDAM", "Smooth CDAM", "TAM", "AM", "Input x gradient"]
    for measure in ("gini", "class_similarity", "correctness_spearman"):
        assert np.allclose(by_method["CDAM"].column(measure).to_numpy(), by_method["Smooth CDAM"].column(measure).to_numpy(), atol=1e-5)


def test_evaluate_without_a_model_measures_the_stored_maps(evaluated, demo_run, tmp_path, capsys):
    run_dir = copy_run(demo_run, tmp_path)
    assert main(["evaluate", run_dir, "--sample", "24", "--steps", "4", "--seed", "3", "--no-model"]) == 0
    assert "note: no model: TAM, input x gradient, correctness and deletion curves are not measured" in capsys.readouterr().err
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
    args = ["--sample", "8", "--steps", "2", "--seed", "5"]
    with S3Proxy(s3_server, fail_every=4, fault=("503", "drop")) as flaky:
        monkeypatch.setenv("AWS_ENDPOINT_URL", flaky.url)
        assert main(["evaluate", url, *args]) == 0
    monkeypatch.undo()
    assert {fault for _, _, fault in flaky.faulted} == {"503", "drop"}
    local = copy_run(demo_run, tmp_path)
    assert main(["evaluate", local, *args]) == 0
    on_s3 = open_run(url).table("evaluation/summary.parquet")
    assert on_s3.num_rows == 4 and on_s3.equals(open_run(local).table("evaluation/summary.parquet"))


def test_a_second_evaluate_is_refused(demo_run, tmp_path, capsys):
    run_dir = copy_run(demo_run, tmp_path)
    with open_run(run_dir).exclusive("evaluate"):
        assert main(["evaluate", run_dir, "--sample", "4", "--no-model"]) == 2
    assert capsys.readouterr().err.strip().startswith(f"cdam evaluate: error: output {run_dir} is in use by another cdam job")
    assert not Path(run_dir, "evaluation").exists()


def test_bad_flags_are_one_line_errors(demo_run, capsys):
    assert main(["evaluate", demo_run, "--sample", "0"]) == 2
    assert capsys.readouterr().err.strip() == "cdam evaluate: error: --sample, --steps and --batch-size must be at least 1 (got 0, 10, 16)"
    assert main(["evaluate", demo_run, "--device", "tpu"]) == 2
    assert capsys.readouterr().err.strip().startswith("cdam evaluate: error: --device 'tpu': ")
    assert main(["evaluate", demo_run, "--checkpoint", "/nowhere/model.pt"]) == 2
    assert capsys.readouterr().err.strip() == "cdam evaluate: error: cannot load the run's model: checkpoint file not found: /nowhere/model.pt; give the model flags (--model, --checkpoint, ...)"
