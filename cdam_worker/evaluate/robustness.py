"""Robustness of the maps to small input changes that leave the prediction as it is:

- max-sensitivity (Yeh et al., 2019, "On the (In)fidelity and Sensitivity of Explanations"; Quantus's
  MaxSensitivity): over ``perturbations`` draws of uniform noise in +-``radius`` x the image's value range,
  those that keep the model's predicted class, the largest ||map(x + u) - map(x)|| / ||map(x)|| (L2 over the
  tokens, the map of the predicted class); NaN when every draw changed the prediction;
- one FGSM step (Goodfellow et al., 2015) of ``fgsm_eps`` x the image's value range, up the cross-entropy of
  the predicted class: the same relative change of the map (``fgsm_change``) and the Spearman correlation of
  the map before and after (``fgsm_spearman``). A step that changes the prediction is reported too (a note
  says how many did): the map is still that of the class predicted before.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F

from cdam_worker.evaluate import metrics


def _predict(model: torch.nn.Module, images: torch.Tensor, rows: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(images[start : start + rows]).argmax(1) for start in range(0, len(images), rows)])


def _relative_change(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(before, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, np.linalg.norm(after - before, axis=-1) / norms, np.nan)


def robustness_checks(
    evaluator, methods: list[str], rows: np.ndarray, keys: np.ndarray, classes: np.ndarray, settings, notes: list[str]
) -> dict[str, dict[str, np.ndarray]]:
    """Per method, per image: ``max_sensitivity``, ``fgsm_change``, ``fgsm_spearman`` (maps of the model's
    predicted class on these images)."""
    images, usable = evaluator.images(keys)
    model, maps, device = evaluator.model.model, evaluator.maps, evaluator.device
    n, draws = len(images), settings.perturbations
    predicted = _predict(model, images, maps.rows)
    spread = (images.flatten(1).amax(1) - images.flatten(1).amin(1)).view(-1, 1, 1, 1)
    generator = torch.Generator().manual_seed(settings.seed)
    noise = (
        (torch.rand((n, draws, *images.shape[1:]), generator=generator).to(device, images.dtype) * 2 - 1)
        * settings.radius
        * spread[:, None]
    )
    noisy = (images[:, None] + noise).flatten(0, 1)
    kept = (_predict(model, noisy, maps.rows).view(n, draws) == predicted[:, None]).cpu().numpy()
    x = images.detach().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x), predicted, reduction="sum"), x)
    adversarial = (images + settings.fgsm_eps * spread * grad.sign()).detach()
    flipped = int((_predict(model, adversarial, maps.rows) != predicted).sum())
    notes.append(
        f"robustness on {n} images: {int((~kept).sum())} of {kept.size} random perturbations (radius {settings.radius} x the value range) "
        f"changed the prediction and were left out; the FGSM step ({settings.fgsm_eps} x the value range) changed {flipped} of {n} predictions"
    )
    image_rows = rows[usable].tolist()
    results = {}
    for method in methods:
        print(f"robustness: {method}", file=sys.stderr)
        wanted = predicted[:, None]
        before = maps(method, images, wanted, image_rows)[:, 0].cpu().numpy()
        after = (
            maps(method, noisy, wanted.repeat_interleave(draws, dim=0), [r for r in image_rows for _ in range(draws)])[
                :, 0
            ]
            .cpu()
            .numpy()
        )
        change = np.where(kept, _relative_change(before[:, None], after.reshape(n, draws, -1)), np.nan)
        with np.errstate(invalid="ignore"):
            sensitivity = np.where(kept.any(axis=1), np.nanmax(np.where(kept, change, -np.inf), axis=1), np.nan)
        attacked = maps(method, adversarial, wanted, image_rows)[:, 0].cpu().numpy()
        results[method] = {
            "max_sensitivity": sensitivity,
            "fgsm_change": _relative_change(before, attacked),
            "fgsm_spearman": metrics.spearman(before, attacked),
        }
    return results
