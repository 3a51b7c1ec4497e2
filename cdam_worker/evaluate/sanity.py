"""Sanity checks of the maps (Adebayo et al., 2018, "Sanity Checks for Saliency Maps"): does a method's map
change when the model does?

- model-parameter randomisation: the head alone (``head``), the last block alone (``last_block``), and the
  cascade from the head down (``cascade_K``: the head and the last K blocks), each layer re-initialised by its
  own ``reset_parameters`` (timm's and torch's initialisation; layer norms back to 1 and 0), seeded per layer
  so that a cascade keeps the layers it had already randomised;
- label randomisation (``labels``), where the run holds labels: retraining the network on shuffled labels is
  out of reach here, so only the linear head is refit on shuffled labels with the features frozen (the run's
  stored pre-logit features; multinomial logistic regression, L-BFGS from the trained head). This tests the
  dependence of a map on what the head learnt, not on what the whole network learnt.

Each method's map of the predicted class before and after is compared per image: Spearman rank correlation
of the signed maps, and SSIM of the maps scaled to 0..1 (``metrics.ssim``). Similarity near 1 after a
randomisation means the map does not depend on what was randomised: the attention map (AM), for one, does
not depend on the head at all.
"""

from __future__ import annotations

import copy
import sys

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from cdam_worker.evaluate import metrics
from cdam_worker.evaluate.methods import ModelMaps
from cdam_worker.maps.model import LoadedModel
from cdam_worker.reading.run import Run
from schemas.evaluation import SANITY_SCHEMA

LABEL_FIT_ROWS = 20_000  # images whose features the shuffled-label head is fit on, at most
SUMMARISED = {"head": "head", "last_block": "last_block", "labels": "labels"}  # and the full cascade as "cascade"


def reset(module: torch.nn.Module, seed: int) -> None:
    """Re-initialise every parameter of ``module`` by its layers' ``reset_parameters``, seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for layer in module.modules():
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()


def randomised_models(model: VisionTransformer, seed: int):
    """(label, model copy) for ``head``, ``last_block`` and ``cascade_1`` ... ``cascade_L``."""
    depth = len(model.blocks)

    def randomised(modules_of) -> VisionTransformer:
        copied = copy.deepcopy(model)
        for position, module in modules_of(copied):
            reset(module, seed * 7919 + position)
        return copied.eval()

    yield "head", randomised(lambda m: [(0, m.head), (0, m.fc_norm)])  # the classifier and the norm before it
    yield "last_block", randomised(lambda m: [(depth, m.blocks[depth - 1])])
    for k in range(1, depth + 1):
        yield (
            f"cascade_{k}",
            randomised(
                lambda m, k=k: [(0, m.head), (0, m.fc_norm)] + [(i + 1, m.blocks[i]) for i in range(depth - k, depth)]
            ),
        )


def label_randomised(run: Run, loaded: LoadedModel, seed: int, notes: list[str]) -> VisionTransformer | None:
    """A copy of the model whose linear head is refit on shuffled labels (features frozen), or None (a note
    says why) when the run has no labels or the head is not one linear layer on the stored features."""
    model = loaded.model
    if "label" not in run.metadata.schema.names:
        notes.append("label randomisation: the run has no labels: skipped")
        return None
    table = run.metadata.to_table(columns=["row", "label"])
    labels = table.column("label").to_numpy(zero_copy_only=False)
    rows = table.column("row").to_numpy()
    known = ~np.isnan(labels.astype(np.float64))
    rows, labels = rows[known], labels[known].astype(np.int64)
    if (
        len(np.unique(labels)) < 2
        or labels.min() < 0
        or labels.max() >= loaded.num_classes
        or not isinstance(model.head, torch.nn.Linear)
    ):
        notes.append(
            "label randomisation: needs labels of two classes or more, all of the model's classes, and a linear head: skipped"
        )
        return None
    if len(rows) > LABEL_FIT_ROWS:
        chosen = np.sort(np.random.default_rng(seed).choice(len(rows), LABEL_FIT_ROWS, replace=False))
        rows, labels = rows[chosen], labels[chosen]
    order = np.argsort(rows)
    features = run.read_rows("embedding", rows[order]).astype(np.float32)
    labels = labels[order]
    written = ~np.isnan(features).any(axis=1)
    features, labels = features[written], labels[written]
    if features.shape[1] != model.head.in_features:
        notes.append(
            f"label randomisation: the stored features have {features.shape[1]} dimensions, the head takes {model.head.in_features}: skipped"
        )
        return None
    shuffled = torch.from_numpy(np.random.default_rng(seed).permutation(labels))
    head = copy.deepcopy(model.head).cpu().float()
    x = torch.from_numpy(features)
    optimiser = torch.optim.LBFGS(head.parameters(), max_iter=100, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimiser.zero_grad()
        value = F.cross_entropy(head(x), shuffled) + 1e-4 * head.weight.square().sum()
        value.backward()
        return value

    optimiser.step(loss)
    with torch.no_grad():
        fit = float((head(x).argmax(1) == shuffled).float().mean())
    notes.append(
        f"label randomisation: the linear head refit on shuffled labels of {len(x)} images with the features frozen "
        f"(accuracy on those shuffled labels {fit:.2f}; the network itself is not retrained)"
    )
    copied = copy.deepcopy(model)
    copied.head = head.to(next(model.parameters()).device, next(model.parameters()).dtype)
    return copied.eval()


def sanity_checks(
    run: Run,
    loaded: LoadedModel,
    evaluator,
    methods: list[str],
    rows: np.ndarray,
    keys: np.ndarray,
    classes: np.ndarray,
    settings,
    notes: list[str],
) -> tuple[pa.Table, dict[str, dict[str, np.ndarray]]]:
    """The sanity table (SANITY_SCHEMA) of ``methods`` on these images (maps of ``classes`` (n, 1), their
    predicted class), and per method the summary's per-image similarities (``sanity_spearman_head`` ...)."""
    images, usable = evaluator.images(keys)
    wanted = torch.from_numpy(classes[usable]).to(evaluator.device)
    grid = tuple(run.grid)
    before = {
        method: evaluator.maps(method, images, wanted, rows[usable].tolist())[:, 0].cpu().numpy() for method in methods
    }

    def variants():  # one randomised copy at a time
        yield from randomised_models(loaded.model, settings.seed)
        relabelled = label_randomised(run, loaded, settings.seed, notes)
        if relabelled is not None:
            yield "labels", relabelled

    table: dict[str, list] = {f.name: [] for f in SANITY_SCHEMA}
    per_image: dict[str, dict[str, np.ndarray]] = {method: {} for method in methods}
    depth = len(loaded.model.blocks)
    for label, model in variants():
        print(f"sanity: {label}", file=sys.stderr)
        maps = ModelMaps(model.to(evaluator.device), evaluator.options, evaluator.device)
        for method in methods:
            after = maps(method, images, wanted, rows[usable].tolist())[:, 0].cpu().numpy()
            spearman = metrics.spearman(before[method], after)
            ssim = metrics.ssim(before[method].reshape(-1, *grid), after.reshape(-1, *grid))
            for name, values in (("spearman", spearman), ("ssim", ssim)):
                finite = values[np.isfinite(values)]
                table[name].append(float(finite.mean()) if len(finite) else float("nan"))
                low, high = metrics.bootstrap_interval(finite, 1000, settings.seed)
                table[f"{name}_low"].append(low)
                table[f"{name}_high"].append(high)
            table["method"].append(method)
            table["randomized"].append(label)
            table["n_images"].append(int(np.isfinite(spearman).sum()))
            summarised = "cascade" if label == f"cascade_{depth}" else SUMMARISED.get(label)
            if summarised:
                per_image[method][f"sanity_spearman_{summarised}"] = spearman
                per_image[method][f"sanity_ssim_{summarised}"] = ssim
    return pa.table(table, schema=SANITY_SCHEMA), per_image
