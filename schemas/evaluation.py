"""The evaluation's tables (``cdam evaluate``, ``DEST/evaluation/``): per image and method, per method, and the
sanity checks. schemas/README.md describes every column."""

from __future__ import annotations

import pyarrow as pa

from schemas.columns import column, columns

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

CURVE = pa.list_(pa.float32())
"""A curve's values, one per step."""

IMAGES_SCHEMA = pa.schema(
    [
        column("key", pa.string(), required=True),
        column("row", pa.int64(), required=True),
        column("method", pa.string(), required=True),
        column("class", pa.int32(), "the predicted class, whose map is measured", required=True),
        column("other_class", pa.int32(), "the runner-up class (class sensitivity), -1 if none", required=True),
        *(column(name, pa.float64(), MEASURE_DOCS.get(name)) for name in MEASURES),
        column("deletion_most_first", CURVE, "logit drop with the most relevant tokens removed first, per step"),
        column("deletion_least_first", CURVE, "the same, least relevant first"),
        column(
            "insertion_most_first", CURVE, "the class's logit with the most relevant tokens inserted first, per step"
        ),
        column(
            "deletion_prob_most_first", CURVE, "the class's probability with the most relevant tokens removed first"
        ),
        column(
            "insertion_prob_most_first", CURVE, "the class's probability with the most relevant tokens inserted first"
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
        column("method", pa.string(), required=True),
        *columns(pa.float64(), *MEASURES),
        column("n_images", pa.int64(), required=True),
        *columns(pa.float64(), *CHECKS),
        *(
            column(f"{name}_{part}", pa.int64() if part == "n" else pa.float64())
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
        column("method", pa.string(), required=True),
        column(
            "randomized",
            pa.string(),
            "head, last_block, cascade_K (the head and the last K blocks), labels",
            required=True,
        ),
        column(
            "spearman", pa.float64(), "mean over the images of the Spearman correlation of the map before and after"
        ),
        column("ssim", pa.float64(), "mean SSIM of the maps before and after, each scaled to 0..1"),
        column("n_images", pa.int64(), required=True),
        *columns(pa.float64(), "spearman_low", "spearman_high", "ssim_low", "ssim_high"),
    ],
    metadata={
        "schema": "cdam.evaluation-sanity/1",
        "doc": "_low, _high: 95% percentile bootstrap interval of the mean over the images",
    },
)
