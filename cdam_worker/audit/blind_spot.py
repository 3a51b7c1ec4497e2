"""CDAM's blind spot: a last attention layer that routes nothing, so every map is about 0.

CDAM differentiates the tokens entering the last attention layer. When that layer's CLS attention is
nearly uniform (about 1/N per token; it happens in small models that read a shortcut into the CLS token
in an earlier block) and the maps are tiny next to the logits they explain, no audit of the maps can see
what the model uses: an empty finding then means "cannot tell", not "no shortcut".

Two numbers from a sample of the run's images tell it:

- ``attention_peak``: the median over images of ``N * max(a)``, where ``a`` is the last block's CLS
  attention over the N patch tokens (mean over heads, renormalised to sum 1): 1 for a perfectly uniform
  attention, N for attention on a single token (trained ViTs: well above 2);
- ``map_to_logit``: the median over images of ``sum |map|`` over tokens and class targets, divided by
  ``sum |logit - mean logit|`` over the same classes: how much of the logits' spread the maps account for.

The blind spot is reported when ``attention_peak < FLAT_ATTENTION`` and ``map_to_logit < SMALL_MAPS``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cdam_worker.reading import Run

SAMPLE_IMAGES = 512
FLAT_ATTENTION = 2.0
SMALL_MAPS = 0.25


@dataclass
class BlindSpot:
    """The two numbers and the verdict, with the line to print when it applies."""

    attention_peak: float
    map_to_logit: float
    images_sampled: int

    @property
    def found(self) -> bool:
        return self.attention_peak < FLAT_ATTENTION and self.map_to_logit < SMALL_MAPS

    def message(self) -> str:
        """One line for the user (empty when the maps can be audited)."""
        if not self.found:
            return ""
        return (
            f"CDAM's blind spot: the last block's attention is nearly uniform (peak {self.attention_peak:.2f} x uniform) "
            f"and the maps account for {self.map_to_logit:.0%} of the logits' spread: they cannot show what the model reads, "
            "so finding no shortcut here means 'cannot tell'; try Smooth or Integrated CDAM (--variant smooth|integrated) "
            "or an earlier checkpoint whose last attention is not flat"
        )

    def as_dict(self) -> dict[str, float | int | bool | str]:
        return {
            "found": self.found,
            "attention_peak": self.attention_peak,
            "map_to_logit": self.map_to_logit,
            "images_sampled": self.images_sampled,
            "message": self.message(),
        }


def check_blind_spot(run: Run, rows: np.ndarray) -> BlindSpot:
    """Measure the blind spot on up to ``SAMPLE_IMAGES`` of ``rows`` (evenly spaced, so every shard counts)."""
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    if len(rows) > SAMPLE_IMAGES:
        rows = rows[np.linspace(0, len(rows) - 1, SAMPLE_IMAGES).round().astype(np.int64)]
    if len(rows) == 0:
        return BlindSpot(float("nan"), float("nan"), 0)
    attention = run.read_rows("attention", rows).astype(np.float64)  # (m, H, gh, gw)
    maps = run.read_rows("cdam", rows).astype(np.float64)  # (m, T, gh, gw)
    target_class = run.read_rows("target_class", rows).astype(np.int64)
    logits = run.read_rows("logits", rows).astype(np.float64)

    weights = np.nan_to_num(attention.mean(axis=1).reshape(len(rows), -1))
    weights = weights / np.maximum(weights.sum(axis=1, keepdims=True), 1e-30)
    peak = weights.shape[1] * weights.max(axis=1)

    is_class = target_class >= 0
    map_mass = np.where(is_class, np.nan_to_num(np.abs(maps)).sum(axis=(2, 3)), 0.0).sum(axis=1)
    margins = np.abs(logits - logits.mean(axis=1, keepdims=True))
    picked = np.take_along_axis(margins, np.clip(target_class, 0, None), axis=1)
    logit_mass = np.where(is_class, np.nan_to_num(picked), 0.0).sum(axis=1)
    usable = (logit_mass > 0) & np.isfinite(attention).all(axis=(1, 2, 3))
    if not usable.any():
        return BlindSpot(float("nan"), float("nan"), 0)
    return BlindSpot(
        float(np.median(peak[usable])), float(np.median(map_mass[usable] / logit_mass[usable])), int(usable.sum())
    )
