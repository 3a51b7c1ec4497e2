"""The record of a flagged cluster's counterfactual tests (``confirm.py`` runs them with the model): its effect
sizes with their intervals, the verdict, and its columns of ``clusters.parquet``. Without torch, so that an
audit that confirms nothing (``--no-model``) and the views that show one do not import it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from schemas.audit import CONFIRMATION_FIELDS

RELIED_DROP_SHARE = 0.5
"""Removing the region must lower the class's logit, beyond the control, by at least this share of the class's
mean lead over the runner-up on the cluster's images (a decisive part of the decision, not a detail of it)."""
MIN_FLIP_RATE = 0.1
"""Pasting the region must flip at least this share of other classes' images to the class."""


@dataclass
class Confirmation:
    """The counterfactual tests of one cluster (see the module docstring)."""

    test: str
    n_removal: int
    drop: tuple[float, float, float]  # mean excess logit drop, bootstrap 95% interval
    control_drop: float
    top1_loss: tuple[float, float, float]  # rate, Wilson 95% interval
    n_paste: int
    flips: tuple[float, float, float]
    control_flips: float
    lead: float  # the class's mean logit lead over the runner-up on the cluster's images
    seconds: float = 0.0

    @property
    def relied_on(self) -> bool:
        removal = self.drop[1] > 0 and self.drop[0] >= RELIED_DROP_SHARE * max(self.lead, 0.0)
        paste = self.n_paste > 0 and self.flips[0] >= MIN_FLIP_RATE and self.flips[1] > self.control_flips
        return bool(removal or paste)

    def in_words(self) -> str:
        """The verdict and its evidence, one clause."""
        what = "removing the spot" if self.test == "mark" else "swapping the background"
        removal = (
            f"{what} lowers the logit by {self.drop[0]:.2f} [{self.drop[1]:.2f}, {self.drop[2]:.2f}] beyond a control "
            f"(its lead over the runner-up: {self.lead:.2f}) and changes the top-1 of {_rate(self.top1_loss)} of "
            f"{self.n_removal} images"
        )
        control = f"(control {self.control_flips:.0%})"
        if not self.n_paste:
            paste = "every image of another class tried was already called the class"
        elif self.test == "mark":
            paste = f"pasting it flips {_rate(self.flips)} of {self.n_paste} other classes' images {control}"
        else:
            paste = f"giving its background to {self.n_paste} other classes' images flips {_rate(self.flips)} {control}"

        verdict = "the model relies on it" if self.relied_on else "the model does not rely on it"
        return f"{verdict}: {removal}; {paste} (95% intervals)"

    def as_row(self) -> dict:
        """The cluster's confirmation columns (``CONFIRMATION_FIELDS``)."""
        nan_none = lambda v: None if v is None or not np.isfinite(v) else float(v)
        return {
            "relied_on": self.relied_on,
            "confirm_test": self.test,
            "confirm_images": self.n_removal,
            "removal_logit_drop": nan_none(self.drop[0]),
            "removal_logit_drop_low": nan_none(self.drop[1]),
            "removal_logit_drop_high": nan_none(self.drop[2]),
            "removal_control_drop": nan_none(self.control_drop),
            "removal_logit_lead": nan_none(self.lead),
            "removal_top1_loss": nan_none(self.top1_loss[0]),
            "removal_top1_loss_low": nan_none(self.top1_loss[1]),
            "removal_top1_loss_high": nan_none(self.top1_loss[2]),
            "paste_images": self.n_paste,
            "paste_flip_rate": nan_none(self.flips[0]),
            "paste_flip_rate_low": nan_none(self.flips[1]),
            "paste_flip_rate_high": nan_none(self.flips[2]),
            "paste_control_flip_rate": nan_none(self.control_flips),
            "confirm_seconds": self.seconds,
            "confirmation": self.in_words(),
        }


def unconfirmed_row() -> dict:
    """The confirmation columns of a cluster that was not tested: all null."""
    return {f.name: None for f in CONFIRMATION_FIELDS}


def _rate(rate: tuple[float, float, float]) -> str:
    return f"{rate[0]:.0%} [{rate[1]:.0%}, {rate[2]:.0%}]"


# -- statistics -----------------------------------------------------------------------------------------
