"""The audit's tables (``cdam audit``, ``DEST/audit/``): per class, per cluster (with the model's confirmation),
per image. schemas/README.md describes every column."""

from __future__ import annotations

import re

import pyarrow as pa

CONFIRMATION_FIELDS = [
    pa.field("relied_on", pa.bool_(), metadata={"doc": "the model relies on the cluster's cue (null: not tested)"}),
    pa.field(
        "confirm_test", pa.string(), metadata={"doc": "mark (remove/paste the spot) or background (swap backgrounds)"}
    ),
    pa.field("confirm_images", pa.int32(), metadata={"doc": "cluster images edited (the removal test)"}),
    pa.field(
        "removal_logit_drop",
        pa.float64(),
        metadata={"doc": "mean drop of the class's logit, region removed, beyond the control"},
    ),
    pa.field("removal_logit_drop_low", pa.float64()),
    pa.field("removal_logit_drop_high", pa.float64()),
    pa.field(
        "removal_control_drop", pa.float64(), metadata={"doc": "mean drop of the class's logit with the control edit"}
    ),
    pa.field(
        "removal_logit_lead", pa.float64(), metadata={"doc": "the class's mean logit lead over the runner-up, unedited"}
    ),
    pa.field(
        "removal_top1_loss", pa.float64(), metadata={"doc": "share of the cluster images whose top-1 leaves the class"}
    ),
    pa.field("removal_top1_loss_low", pa.float64()),
    pa.field("removal_top1_loss_high", pa.float64()),
    pa.field("paste_images", pa.int32(), metadata={"doc": "images of other classes the region was pasted into"}),
    pa.field("paste_flip_rate", pa.float64(), metadata={"doc": "share of them whose top-1 becomes the class"}),
    pa.field("paste_flip_rate_low", pa.float64()),
    pa.field("paste_flip_rate_high", pa.float64()),
    pa.field("paste_control_flip_rate", pa.float64(), metadata={"doc": "the same with the control region pasted"}),
    pa.field("confirm_seconds", pa.float64(), metadata={"doc": "wall time of this cluster's confirmation"}),
    pa.field("confirmation", pa.string(), metadata={"doc": "the verdict in words"}),
]
"""The columns of a cluster's confirmation with the model (null where it was not tested)."""

CLASSES_SCHEMA = pa.schema(
    [
        pa.field("class", pa.int32(), nullable=False),
        pa.field("class_name", pa.string(), nullable=False),
        pa.field("n_images", pa.int32(), nullable=False),
        pa.field("score", pa.float64(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("flagged", pa.bool_(), nullable=False),
        pa.field("reasons", pa.string(), nullable=False),
        pa.field("n_clusters", pa.int32(), nullable=False),
        pa.field("eigenvalues", pa.list_(pa.float32()), nullable=False),
        pa.field("kinds", pa.list_(pa.string()), nullable=False),
        pa.field("place_p", pa.float64(), nullable=False),
        pa.field("tipping_p", pa.float64(), nullable=False),
        pa.field(
            "relied_on", pa.bool_(), metadata={"doc": "the model relies on a tested cluster's cue (null: none tested)"}
        ),
    ],
    metadata={"schema": "cdam.audit.classes/2"},
)
CLUSTERS_SCHEMA = pa.schema(
    [
        pa.field("class", pa.int32(), nullable=False),
        pa.field("cluster", pa.int32(), nullable=False),
        pa.field("size", pa.int32(), nullable=False),
        pa.field("share", pa.float64(), nullable=False),
        pa.field("purity", pa.float64()),
        pa.field("prototype", pa.list_(pa.float32()), nullable=False),
        pa.field("medoid_key", pa.string(), nullable=False),
        pa.field("flagged", pa.bool_(), nullable=False),
        pa.field("score", pa.float64(), nullable=False),
        pa.field("focus", pa.float64(), nullable=False),
        pa.field("concentration", pa.float64(), nullable=False),
        pa.field("rarity", pa.float64(), nullable=False),
        pa.field("other_labels", pa.float64()),
        pa.field("spot_area", pa.float64(), nullable=False),
        pa.field("place", pa.string(), nullable=False),
        pa.field("centroid_y", pa.float64(), nullable=False),
        pa.field("centroid_x", pa.float64(), nullable=False),
        pa.field("spread", pa.float64(), nullable=False),
        pa.field("border", pa.float64(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("off_place", pa.float64(), nullable=False),
        *CONFIRMATION_FIELDS,
    ],
    metadata={"schema": "cdam.audit.clusters/2"},
)
IMAGES_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("row", pa.int64(), nullable=False),
        pa.field("class", pa.int32(), nullable=False),
        pa.field("cluster", pa.int32(), nullable=False),
        pa.field("x", pa.float32(), nullable=False),
        pa.field("y", pa.float32(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
        pa.field("flagged", pa.bool_(), nullable=False),
        pa.field("spot_y", pa.float32(), nullable=False),
        pa.field("spot_x", pa.float32(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("off_place", pa.float32(), nullable=False),
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
