"""`cdam audit`'s confirmation with the model: the counterfactual tests, their intervals, and the verdicts.

Two kinds of model: small hand-written ones whose reliance on a cue is known by construction (one reads a
corner, one reads only the centre; one reads the background), and the demo's trained ViT, which relies on
its planted corner watermark. The demo run (``demo_run``) was audited by ``cdam demo`` with the model, so its
``clusters.parquet`` holds the confirmation; a copy is audited again with ``--no-model``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cdam_worker.audit import (
    AuditOptions,
    ConfirmSettings,
    apply_confirmations,
    audit_run,
    confirm_clusters,
)
from cdam_worker.audit.confirm import (
    ClusterImages,
    bootstrap_mean,
    counterfactual_tests,
    fill_with_surroundings,
    moved_regions,
    paste,
    spot_regions,
    wilson,
)
from cdam_worker.reading import open_run
from schemas.audit import CONFIRMATION_FIELDS
from cdam_worker.views import pages
from cdam_worker.views.catalog import Catalog
from cdam_worker.views.report import build_report
from jobs.cli import main

ROOT = Path(__file__).resolve().parents[1]
PATCH = (8, 8)
GRID = (8, 8)


# --- the statistics and the edits ---------------------------------------------------------------------------


def test_wilson_and_bootstrap_intervals_match_reference_values() -> None:
    """Wilson 5 of 20: [0.1119, 0.4687] (the textbook value); 0 of 64 has an upper bound of 0.0566, not 0."""
    rate, low, high = wilson(5, 20)
    assert rate == 0.25 and low == pytest.approx(0.1119, abs=1e-4) and high == pytest.approx(0.4687, abs=1e-4)
    assert wilson(0, 64)[1] == 0.0 and wilson(0, 64)[2] == pytest.approx(0.0566, abs=1e-4)
    assert all(np.isnan(wilson(0, 0)))
    values = np.random.default_rng(1).normal(2.0, 1.0, size=400)
    mean, low, high = bootstrap_mean(values, np.random.default_rng(0))
    half = 1.96 * values.std() / np.sqrt(len(values))  # the normal interval the bootstrap approximates
    assert (
        mean == pytest.approx(values.mean())
        and low == pytest.approx(mean - half, abs=0.03)
        and high == pytest.approx(mean + half, abs=0.03)
    )


def test_regions_grow_over_a_larger_mark_and_controls_do_not_overlap_them() -> None:
    maps = np.zeros((2, *GRID))
    maps[0, 6:, 6:] = 1.0  # a 2 x 2 mark in the corner
    maps[1, 2:5, 2:5] = 1.0  # a 3 x 3 mark: larger than the 2 x 2 spot
    regions = spot_regions(maps, np.array([7 / 8, 3 / 8]), np.array([7 / 8, 3 / 8]))
    assert regions[0].sum() == 4 and regions[0, 6:, 6:].all()
    assert regions[1].sum() == 9 and regions[1, 2:5, 2:5].all()
    controls = moved_regions(regions, np.random.default_rng(0))
    assert (controls.sum(axis=(1, 2)) == regions.sum(axis=(1, 2))).all() and not (controls & regions).any()


def test_removal_fills_with_the_surroundings_and_paste_copies_the_donor() -> None:
    images = torch.arange(2 * 3 * 64 * 64, dtype=torch.float32).view(2, 3, 64, 64) % 7
    region = np.zeros((2, *GRID), dtype=bool)
    region[:, 3, 3] = True
    filled = fill_with_surroundings(images, region, PATCH)
    ring = torch.zeros(64, 64, dtype=torch.bool)
    ring[16:40, 16:40] = True
    ring[24:32, 24:32] = False
    expected = images[:, :, ring].mean(dim=2)  # (2, 3): the ring's mean colour
    assert torch.allclose(filled[:, :, 24:32, 24:32], expected[:, :, None, None].expand(-1, -1, 8, 8))
    outside = torch.ones(64, 64, dtype=torch.bool)
    outside[24:32, 24:32] = False
    assert torch.equal(filled[:, :, outside], images[:, :, outside])
    donors = -images
    pasted = paste(images, donors, region, PATCH)
    assert torch.equal(pasted[:, :, 24:32, 24:32], donors[:, :, 24:32, 24:32]) and torch.equal(
        pasted[:, :, outside], images[:, :, outside]
    )


# --- hand-written models: reliance known by construction -------------------------------------------------------


class CornerOrCentre(torch.nn.Module):
    """Class 0's logit is 10 x the brightness of the bottom-right patch (when ``reads_corner``) plus the centre's
    red; class 1's is the centre's green: a model that does or does not rely on a corner mark."""

    def __init__(self, reads_corner: bool) -> None:
        super().__init__()
        self.reads_corner = reads_corner

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        centre = images[:, :, 24:40, 24:40].mean((2, 3))
        corner = images[:, :, 56:, 56:].mean((1, 2, 3)) if self.reads_corner else torch.zeros(len(images))
        return torch.stack([10 * corner + centre[:, 0], centre[:, 1] + 1.5], dim=1)


def marked_data(n: int = 40, seed: int = 0) -> ClusterImages:
    """Class-0 images (red centre, a bright corner mark) and class-1 recipients (green centre), with the corner as region."""
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(rng.uniform(0, 0.2, (n, 3, 64, 64)).astype(np.float32))
    images[:, 0, 24:40, 24:40] += 0.3
    images[:, :, 56:, 56:] = 1.0
    recipients = torch.from_numpy(rng.uniform(0, 0.2, (n, 3, 64, 64)).astype(np.float32))
    recipients[:, 1, 24:40, 24:40] += 0.8
    regions = np.zeros((n, *GRID), dtype=bool)
    regions[:, 7, 7] = True
    objects = np.zeros((n, *GRID), dtype=bool)
    objects[:, 3:5, 3:5] = True
    return ClusterImages(images, regions, moved_regions(regions, rng), recipients, objects)


def test_a_model_that_reads_the_mark_is_confirmed() -> None:
    result = counterfactual_tests(
        CornerOrCentre(reads_corner=True), 0, "mark", marked_data(), PATCH, np.random.default_rng(0), batch=16
    )
    assert result.relied_on and result.n_removal == 40 and result.n_paste == 40
    assert result.drop[1] > 5.0  # 10 x (1 - the ring's ~0.1 mean): the whole drop, and the control's is ~0
    assert abs(result.control_drop) < 0.1
    assert result.top1_loss[0] == 1.0 and result.flips[0] == 1.0 and result.control_flips == 0.0
    assert "the model relies on it" in result.in_words()


def test_a_model_that_ignores_the_mark_is_not_confirmed() -> None:
    result = counterfactual_tests(
        CornerOrCentre(reads_corner=False), 0, "mark", marked_data(), PATCH, np.random.default_rng(0), batch=16
    )
    assert not result.relied_on
    assert result.drop[0] == pytest.approx(0.0, abs=0.01) and result.flips[0] == 0.0 and result.flips[2] < 0.1
    assert result.in_words().startswith("the model does not rely on it")


class BackgroundReader(torch.nn.Module):
    """Class 0's logit is 10 x the blue of the image outside its centre (a "water" background), class 1's the centre's green."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        outside = torch.ones(64, 64, dtype=torch.bool)
        outside[16:48, 16:48] = False
        return torch.stack([10 * images[:, 2, outside].mean(1), images[:, 1, 24:40, 24:40].mean((1, 2)) * 5], dim=1)


def test_a_background_cue_is_confirmed_by_swapping_backgrounds() -> None:
    rng = np.random.default_rng(0)
    n = 30
    images = torch.zeros(n, 3, 64, 64)
    images[:, 2] = 0.8  # water everywhere
    images[:, 0, 16:48, 16:48], images[:, 2, 16:48, 16:48] = 0.7, 0.0  # a red object in the middle
    recipients = torch.zeros(n, 3, 64, 64)
    recipients[:, 1, 16:48, 16:48] = 0.9  # a green object on black
    regions = np.ones((n, *GRID), dtype=bool)
    regions[:, 2:6, 2:6] = False  # the class's evidence lies around the object
    objects = ~regions
    result = counterfactual_tests(
        BackgroundReader(),
        0,
        "background",
        ClusterImages(images, regions, None, recipients, objects),
        PATCH,
        rng,
        8,
    )
    assert result.test == "background" and result.relied_on
    assert result.drop[1] > 5.0 and result.flips[0] == 1.0 and result.control_flips == 0.0


class ObjectReader(torch.nn.Module):
    """Class 0's logit is 10 x the red of the image's centre (its object); the background counts for nothing."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        centre = images[:, :, 16:48, 16:48]
        return torch.stack([10 * centre[:, 0].mean((1, 2)), 5 * centre[:, 1].mean((1, 2))], dim=1)


def test_a_model_that_ignores_the_background_is_not_confirmed() -> None:
    """The background swapped for another class's or for another cluster image's: the same logit, so no drop beyond
    the control; given to other classes' images, it flips none."""
    rng = np.random.default_rng(1)
    n = 30
    images = torch.zeros(n, 3, 64, 64)
    images[:, 2] = torch.rand(n, 1, 1) * 0.5 + 0.5  # water of varying blue
    images[:, 0, 16:48, 16:48], images[:, 2, 16:48, 16:48] = 0.7, 0.0  # the red object
    recipients = torch.zeros(n, 3, 64, 64)
    recipients[:, 1, 16:48, 16:48] = 0.9
    regions = np.ones((n, *GRID), dtype=bool)
    regions[:, 2:6, 2:6] = False
    result = counterfactual_tests(
        ObjectReader(), 0, "background", ClusterImages(images, regions, None, recipients, ~regions), PATCH, rng, 8
    )
    assert result.test == "background" and not result.relied_on
    assert result.drop[0] == pytest.approx(0.0, abs=1e-4) and result.flips[0] == 0.0 and result.control_flips == 0.0


# --- the demo's trained ViT: its corner watermark -------------------------------------------------------------------


def clusters_of(dest: str) -> list[dict]:
    return open_run(dest).table("audit/clusters.parquet").to_pylist()


def test_the_demo_watermark_cluster_is_confirmed_by_its_model(demo_run: str) -> None:
    """`cdam demo` audited with the model: the corner cluster's logit drop has an interval above 0, other classes flip."""
    corner = [
        row
        for row in clusters_of(demo_run)
        if row["class"] == 0 and "bottom-right corner" in row["place"] and row["relied_on"]
    ]
    assert corner, clusters_of(demo_run)
    row = max(corner, key=lambda r: r["size"])
    assert row["flagged"] and row["confirm_test"] == "mark" and row["confirm_images"] >= 10
    assert row["removal_logit_drop_low"] > 0 and row["removal_logit_drop"] > row["removal_control_drop"]
    assert (
        row["paste_images"] >= 10
        and row["paste_flip_rate_low"] > 0
        and row["paste_flip_rate"] > row["paste_control_flip_rate"]
    )
    assert row["removal_logit_drop_low"] <= row["removal_logit_drop"] <= row["removal_logit_drop_high"]
    assert row["confirm_seconds"] > 0 and row["confirmation"].startswith("the model relies on it")
    tested = [r for r in clusters_of(demo_run) if r["relied_on"] is not None]
    assert all(r["flagged"] == r["relied_on"] for r in tested)
    summary = json.loads(open_run(demo_run).storage.get("audit/summary.json"))
    assert summary["confirmation"]["clusters_tested"] == len(tested) and "relies on" in summary["confirmation"]["note"]
    circle = next(r for r in open_run(demo_run).table("audit/classes.parquet").to_pylist() if r["class"] == 0)
    assert circle["flagged"] and "model check: it relies on" in circle["reasons"]


def test_a_cluster_whose_region_the_model_does_not_use_is_reported_and_not_flagged(demo_run: str) -> None:
    """The watermark cluster's images, but with their spots moved to the top-left corner (background texture, which
    the model does not read): the test says the model does not rely on it, and the cluster and class are unflagged."""
    run = open_run(demo_run)
    result = audit_run(run, AuditOptions())
    circle = next(a for a in result.audited if a.index == 0)
    flagged = [c for c in circle.clusters if c.flagged]
    assert flagged
    for other in result.audited:  # only circle's clusters are tested
        for cluster in other.clusters:
            cluster.flagged = cluster.flagged and other.index == 0
    circle.spots[:] = 1 / 8  # the spot of each image, as the confirmation reads it (for a mark: where it lies)
    result.gathered.class_maps[circle.positions] = 0.0
    result.gathered.class_maps[circle.positions, :2, :2] = (
        1.0  # evidence on the spot only: the region is the 2 x 2 spot
    )
    model = run.load_model()
    confirmations, notes = confirm_clusters(
        run, result, model, ConfirmSettings(images=32, recipients=32, seed=3), progress=lambda _: None
    )
    assert not notes and len(confirmations) == len(flagged)
    for confirmation in confirmations.values():
        assert not confirmation.relied_on, confirmation.in_words()
        assert confirmation.flips[0] < 0.1
    scores = {c.cluster: c.score for c in circle.clusters}
    apply_confirmations(result, confirmations, notes)
    rows = [r for r in result.clusters.to_pylist() if r["class"] == 0 and r["relied_on"] is not None]
    assert rows and all(not r["flagged"] and r["relied_on"] is False for r in rows)
    assert all(r["score"] == scores[r["cluster"]] for r in rows)  # the detection score is kept
    row = next(r for r in result.classes.to_pylist() if r["class"] == 0)
    assert not row["flagged"] and "the model does not rely on" in row["reasons"]
    assert not any(r["flagged"] for r in result.images.to_pylist() if r["class"] == 0)


def test_no_model_writes_null_confirmation_and_says_so(demo_run: str, tmp_path: Path, capsys) -> None:
    dest = tmp_path / "run"
    shutil.copytree(demo_run, dest)
    assert main(["audit", str(dest), "--no-model"]) == 0
    out = capsys.readouterr().out
    assert "findings unconfirmed: --no-model" in out
    clusters = pq.read_table(dest / "audit" / "clusters.parquet")
    for field in CONFIRMATION_FIELDS:
        assert clusters.column(field.name).null_count == clusters.num_rows, field.name
    assert (
        json.loads((dest / "audit" / "summary.json").read_text())["confirmation"]["note"]
        == "findings unconfirmed: --no-model"
    )
    catalog = Catalog(open_run(str(dest)))
    assert "Unconfirmed: not tested with the model." in pages.class_audit(catalog.class_audit_row(0), catalog.no_audit)


def test_the_confirmation_columns_are_documented() -> None:
    readme, schemas = (ROOT / "README.md").read_text(), (ROOT / "schemas" / "README.md").read_text()
    for field in CONFIRMATION_FIELDS:
        assert f"`{field.name}`" in readme and f"`{field.name}`" in schemas, field.name


def test_the_report_and_the_class_page_show_the_models_verdict(demo_run: str) -> None:
    """The report (and the dashboard's class page, made of the same parts) say whether the model relies on each
    tested cluster, with the logit drop and flip rate and their intervals."""
    html, _ = build_report(open_run(demo_run), n_classes=1, per_class=2)
    assert "The model relies on the cue the maps point at" in html and "model relies on it</span>: logit drop" in html
    assert "<th>model</th>" in html and "relies on it" in html
    catalog = Catalog(open_run(demo_run))
    page = pages.class_audit(catalog.class_audit_row(0), catalog.no_audit)
    assert "The model relies on the cue the maps point at" in page
    cards = pages.prototypes(catalog.clusters(0), lambda k: "", lambda key: "", None)
    tested = [c for c in catalog.clusters(0) if c["relied_on"] is not None]
    assert cards.count("logit drop") == len(tested) > 0
