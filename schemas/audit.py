"""The audit's tables (``cdam audit``, ``DEST/audit/``): per class, per cluster (with the model's confirmation),
per image. schemas/README.md describes every column."""

from __future__ import annotations

import re

import pyarrow as pa

from schemas.columns import column, columns

CONFIRMATION_FIELDS = [
    column("relied_on", pa.bool_(), "the model relies on the cluster's cue (null: not tested)"),
    column("confirm_test", pa.string(), "mark (remove/paste the spot) or background (swap backgrounds)"),
    column("confirm_images", pa.int32(), "cluster images edited (the removal test)"),
    column("removal_logit_drop", pa.float64(), "mean drop of the class's logit, region removed, beyond the control"),
    *columns(pa.float64(), "removal_logit_drop_low", "removal_logit_drop_high"),
    column("removal_control_drop", pa.float64(), "mean drop of the class's logit with the control edit"),
    column("removal_logit_lead", pa.float64(), "the class's mean logit lead over the runner-up, unedited"),
    column("removal_top1_loss", pa.float64(), "share of the cluster images whose top-1 leaves the class"),
    *columns(pa.float64(), "removal_top1_loss_low", "removal_top1_loss_high"),
    column("paste_images", pa.int32(), "images of other classes the region was pasted into"),
    column("paste_flip_rate", pa.float64(), "share of them whose top-1 becomes the class"),
    *columns(pa.float64(), "paste_flip_rate_low", "paste_flip_rate_high"),
    column("paste_control_flip_rate", pa.float64(), "the same with the control region pasted"),
    column("confirm_seconds", pa.float64(), "wall time of this cluster's confirmation"),
    column("confirmation", pa.string(), "the verdict in words"),
]
"""The columns of a cluster's confirmation with the model (null where it was not tested)."""

CLASSES_SCHEMA = pa.schema(
    [
        column("class", pa.int32(), required=True),
        column("class_name", pa.string(), required=True),
        column("n_images", pa.int32(), required=True),
        column("score", pa.float64(), required=True),
        column("rank", pa.int32(), required=True),
        column("flagged", pa.bool_(), required=True),
        column("reasons", pa.string(), required=True),
        column("n_clusters", pa.int32(), required=True),
        column("eigenvalues", pa.list_(pa.float32()), required=True),
        column("kinds", pa.list_(pa.string()), required=True),
        *columns(pa.float64(), "place_p", "tipping_p", required=True),
        column("relied_on", pa.bool_(), "the model relies on a tested cluster's cue (null: none tested)"),
    ],
    metadata={"schema": "cdam.audit.classes/2"},
)
CLUSTERS_SCHEMA = pa.schema(
    [
        *columns(pa.int32(), "class", "cluster", "size", required=True),
        column("share", pa.float64(), required=True),
        column("purity", pa.float64()),
        column("prototype", pa.list_(pa.float32()), required=True),
        column("medoid_key", pa.string(), required=True),
        column("flagged", pa.bool_(), required=True),
        *columns(pa.float64(), "score", "focus", "concentration", "rarity", required=True),
        column("other_labels", pa.float64()),
        column("spot_area", pa.float64(), required=True),
        column("place", pa.string(), required=True),
        *columns(pa.float64(), "centroid_y", "centroid_x", "spread", "border", required=True),
        column("kind", pa.string(), required=True),
        column("off_place", pa.float64(), required=True),
        *CONFIRMATION_FIELDS,
    ],
    metadata={"schema": "cdam.audit.clusters/2"},
)
IMAGES_SCHEMA = pa.schema(
    [
        column("key", pa.string(), required=True),
        column("row", pa.int64(), required=True),
        *columns(pa.int32(), "class", "cluster", required=True),
        *columns(pa.float32(), "x", "y", "score", required=True),
        column("flagged", pa.bool_(), required=True),
        *columns(pa.float32(), "spot_y", "spot_x", required=True),
        column("kind", pa.string(), required=True),
        column("off_place", pa.float32(), required=True),
    ],
    metadata={"schema": "cdam.audit.images/2"},
)


def audit_flags(summary: dict, class_names: list[str]) -> str:
    """The flags of ``cdam audit`` that made the audit whose ``summary.json`` is ``summary`` (they decide what it
    found: another set of them is another audit), e.g. ``--by label --classes circle,square --min-images 50``."""
    options = summary.get("options", {})
    classes = ",".join(class_names[c] if 0 <= c < len(class_names) else str(c) for c in options.get("classes", []))
    return (
        f"--by {summary.get('by', 'pred')}"
        + (f" --classes {classes}" if classes else "")
        + (f" --min-images {options.get('min_images', '?')}")
    )


CONTACT_SHEET_NAME = re.compile(r"(\d+)-.*-cluster-(\d+)\.png")
"""A sheet's file name: ``<class index>-<safe class name>-cluster-<cluster>.png``."""


def contact_sheet_path(class_index: int, class_name: str, cluster: int) -> str:
    """Where a flagged cluster's contact sheet goes below the audit folder (its file name matches ``CONTACT_SHEET_NAME``)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", class_name).strip("_") or "class"
    return f"contact-sheets/{class_index}-{safe}-cluster-{cluster}.png"
