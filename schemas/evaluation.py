"""The evaluation's tables (``cdam evaluate``, ``DEST/evaluation/``): per image and method, per method, and the
sanity checks. schemas/README.md describes every column."""

from __future__ import annotations

import pyarrow as pa

MEASURES = (
    "compactness",
    "gini",
    "correctness_spearman",
    "deletion_auc_gap",
    "class_similarity",
    "class_similarity_spearman",
    "deletion_auc",
    "insertion_auc",
    "deletion_auc_prob",
    "insertion_auc_prob",
)
MEASURE_DOCS = {
    "deletion_auc": "area under the class's logit as the most relevant tokens are removed first, over the share removed (lower: better)",
    "insertion_auc": "area under the class's logit as the most relevant tokens are inserted first (into the prefix tokens alone; higher: better)",
    "deletion_auc_prob": "deletion_auc in softmax probability",
    "insertion_auc_prob": "insertion_auc in softmax probability",
}

IMAGES_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("row", pa.int64(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        pa.field("class", pa.int32(), nullable=False, metadata={"doc": "the predicted class, whose map is measured"}),
        pa.field(
            "other_class",
            pa.int32(),
            nullable=False,
            metadata={"doc": "the runner-up class (class sensitivity), -1 if none"},
        ),
        *(
            pa.field(name, pa.float64(), metadata={"doc": MEASURE_DOCS[name]} if name in MEASURE_DOCS else None)
            for name in MEASURES
        ),
        pa.field(
            "deletion_most_first",
            pa.list_(pa.float32()),
            metadata={"doc": "logit drop with the most relevant tokens removed first, per step"},
        ),
        pa.field("deletion_least_first", pa.list_(pa.float32()), metadata={"doc": "the same, least relevant first"}),
        pa.field(
            "insertion_most_first",
            pa.list_(pa.float32()),
            metadata={"doc": "the class's logit with the most relevant tokens inserted first, per step"},
        ),
        pa.field(
            "deletion_prob_most_first",
            pa.list_(pa.float32()),
            metadata={"doc": "the class's probability with the most relevant tokens removed first"},
        ),
        pa.field(
            "insertion_prob_most_first",
            pa.list_(pa.float32()),
            metadata={"doc": "the class's probability with the most relevant tokens inserted first"},
        ),
    ],
    metadata={"schema": "cdam.evaluation-images/1"},
)
CHECKS = (
    "sanity_spearman_head",
    "sanity_ssim_head",
    "sanity_spearman_last_block",
    "sanity_ssim_last_block",
    "sanity_spearman_cascade",
    "sanity_ssim_cascade",
    "sanity_spearman_labels",
    "sanity_ssim_labels",
    "max_sensitivity",
    "fgsm_change",
    "fgsm_spearman",
)
"""Summary measures of the sanity checks (``cascade``: the head and every block randomised) and robustness."""
SUMMARY_SCHEMA = pa.schema(
    [
        pa.field("method", pa.string(), nullable=False),
        *(pa.field(name, pa.float64()) for name in MEASURES),
        pa.field("n_images", pa.int64(), nullable=False),
        *(pa.field(name, pa.float64()) for name in CHECKS),
        *(
            pa.field(f"{name}_{part}", pa.int64() if part == "n" else pa.float64())
            for name in MEASURES + CHECKS
            for part in ("low", "high", "n")
        ),
    ],
    metadata={
        "schema": "cdam.evaluation-summary/2",
        "doc": "mean over the images of each measure; _low, _high: 95% percentile bootstrap interval of the mean; _n: images",
    },
)

SANITY_SCHEMA = pa.schema(
    [
        pa.field("method", pa.string(), nullable=False),
        pa.field(
            "randomized",
            pa.string(),
            nullable=False,
            metadata={"doc": "head, last_block, cascade_K (the head and the last K blocks), labels"},
        ),
        pa.field(
            "spearman",
            pa.float64(),
            metadata={"doc": "mean over the images of the Spearman correlation of the map before and after"},
        ),
        pa.field("ssim", pa.float64(), metadata={"doc": "mean SSIM of the maps before and after, each scaled to 0..1"}),
        pa.field("n_images", pa.int64(), nullable=False),
        pa.field("spearman_low", pa.float64()),
        pa.field("spearman_high", pa.float64()),
        pa.field("ssim_low", pa.float64()),
        pa.field("ssim_high", pa.float64()),
    ],
    metadata={
        "schema": "cdam.evaluation-sanity/1",
        "doc": "_low, _high: 95% percentile bootstrap interval of the mean over the images",
    },
)
