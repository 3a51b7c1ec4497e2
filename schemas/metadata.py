"""Arrow schemas of the Parquet tables a run writes: ``metadata/`` (one row per explained image), ``errors/``,
``members/`` (where each file of an uncompressed shard lies in it) and ``derived/NAME/metadata.parquet``
(one row per image of maps derived from the basis by ``cdam derive``).

Per-target columns are lists aligned with ``targets``: element k describes the map ``cdam[row, k]``.
"""

from __future__ import annotations

import pyarrow as pa

from schemas.columns import column

SAMPLE_FIELDS = [
    column("key", pa.string(), "WebDataset __key__ of the sample", required=True),
    column("shard", pa.string(), "shard name (file name without .tar)", required=True),
    column("shard_index", pa.int32(), "position of the shard in the run's shard list", required=True),
]
"""Where a row's sample comes from (the first columns of every per-image table)."""

SLOT_SUMMARY_FIELDS = [
    column("target_names", pa.list_(pa.string()), "class or concept name of each slot", required=True),
    column("relevance_pos_sum", pa.list_(pa.float32()), "sum of positive CDAM scores per slot", required=True),
    column("relevance_neg_sum", pa.list_(pa.float32()), "sum of negative CDAM scores per slot", required=True),
    column(
        "relevance_argmax",
        pa.list_(pa.int32()),
        "flat token index (y * gw + x) of the largest score per slot",
        required=True,
    ),
]
"""Per target slot k (after its ``targets`` column): its name and what the map ``cdam[row, k]`` holds."""

METADATA_SCHEMA = pa.schema(
    [
        *SAMPLE_FIELDS,
        column("row", pa.int64(), "index along the Zarr 'image' axis", required=True),
        column("label", pa.int32(), "ground-truth class from the 'cls' member, null if absent"),
        column(
            "pred",
            pa.int32(),
            "predicted class (argmax of logits); -1 for a model without classes (a feature extractor explained for concepts)",
            required=True,
        ),
        column("pred_prob", pa.float32(), "softmax probability of pred", required=True),
        column("topk_classes", pa.list_(pa.int32()), "top-5 predicted classes", required=True),
        column("topk_probs", pa.list_(pa.float32()), "their softmax probabilities", required=True),
        column("targets", pa.list_(pa.int32()), "class of each target slot, -1 for concepts", required=True),
        *SLOT_SUMMARY_FIELDS,
        column(
            "width", pa.int32(), "original image width in pixels, upright (EXIF orientation applied)", required=True
        ),
        column(
            "height", pa.int32(), "original image height in pixels, upright (EXIF orientation applied)", required=True
        ),
        column("sample_json", pa.string(), "the sample's 'json' member, verbatim, null if absent"),
        column("run_id", pa.string(), "id of the run that wrote the row", required=True),
    ],
    metadata={"schema": "cdam.metadata/1"},
)

ERRORS_SCHEMA = pa.schema(
    [
        column("shard", pa.string(), required=True),
        column("shard_index", pa.int32(), required=True),
        column("key", pa.string(), "null for a shard-level problem (truncated tar, unreadable object)"),
        column("reason", pa.string(), required=True),
        column("run_id", pa.string(), required=True),
    ],
    metadata={"schema": "cdam.errors/1"},
)

MEMBERS_SCHEMA = pa.schema(
    [
        column("key", pa.string(), "WebDataset __key__ of the sample", required=True),
        column("member", pa.string(), "name of the tar member (a file of the sample)", required=True),
        column("offset", pa.int64(), "byte offset of the member's data in the shard file", required=True),
        column("size", pa.int64(), "bytes of the member's data", required=True),
    ],
    metadata={"schema": "cdam.members/1"},
)

DERIVED_METADATA_SCHEMA = pa.schema(
    [
        *SAMPLE_FIELDS,
        column("row", pa.int64(), "index along the Zarr 'image' axis (of derived/NAME/cdam too)", required=True),
        column("targets", pa.list_(pa.int32()), "class of each derived slot, -1 for concepts", required=True),
        *SLOT_SUMMARY_FIELDS,
    ],
    metadata={"schema": "cdam.derived-metadata/1"},
)
