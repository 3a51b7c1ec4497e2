"""Arrow schemas of the Parquet tables a run writes: ``metadata/`` (one row per explained image), ``errors/``,
``members/`` (where each file of an uncompressed shard lies in it) and ``derived/NAME/metadata.parquet``
(one row per image of maps derived from the basis by ``cdam derive``).

Per-target columns are lists aligned with ``targets``: element k describes the map ``cdam[row, k]``.
"""

from __future__ import annotations

import pyarrow as pa

SAMPLE_FIELDS = [
    pa.field("key", pa.string(), nullable=False, metadata={"doc": "WebDataset __key__ of the sample"}),
    pa.field("shard", pa.string(), nullable=False, metadata={"doc": "shard name (file name without .tar)"}),
    pa.field(
        "shard_index", pa.int32(), nullable=False, metadata={"doc": "position of the shard in the run's shard list"}
    ),
]
"""Where a row's sample comes from (the first columns of every per-image table)."""

SLOT_SUMMARY_FIELDS = [
    pa.field(
        "target_names",
        pa.list_(pa.string()),
        nullable=False,
        metadata={"doc": "class or concept name of each slot"},
    ),
    pa.field(
        "relevance_pos_sum",
        pa.list_(pa.float32()),
        nullable=False,
        metadata={"doc": "sum of positive CDAM scores per slot"},
    ),
    pa.field(
        "relevance_neg_sum",
        pa.list_(pa.float32()),
        nullable=False,
        metadata={"doc": "sum of negative CDAM scores per slot"},
    ),
    pa.field(
        "relevance_argmax",
        pa.list_(pa.int32()),
        nullable=False,
        metadata={"doc": "flat token index (y * gw + x) of the largest score per slot"},
    ),
]
"""Per target slot k (after its ``targets`` column): its name and what the map ``cdam[row, k]`` holds."""

METADATA_SCHEMA = pa.schema(
    [
        *SAMPLE_FIELDS,
        pa.field("row", pa.int64(), nullable=False, metadata={"doc": "index along the Zarr 'image' axis"}),
        pa.field("label", pa.int32(), metadata={"doc": "ground-truth class from the 'cls' member, null if absent"}),
        pa.field(
            "pred",
            pa.int32(),
            nullable=False,
            metadata={
                "doc": "predicted class (argmax of logits); -1 for a model without classes (a feature extractor explained for concepts)"
            },
        ),
        pa.field("pred_prob", pa.float32(), nullable=False, metadata={"doc": "softmax probability of pred"}),
        pa.field("topk_classes", pa.list_(pa.int32()), nullable=False, metadata={"doc": "top-5 predicted classes"}),
        pa.field("topk_probs", pa.list_(pa.float32()), nullable=False, metadata={"doc": "their softmax probabilities"}),
        pa.field(
            "targets",
            pa.list_(pa.int32()),
            nullable=False,
            metadata={"doc": "class of each target slot, -1 for concepts"},
        ),
        *SLOT_SUMMARY_FIELDS,
        pa.field(
            "width",
            pa.int32(),
            nullable=False,
            metadata={"doc": "original image width in pixels, upright (EXIF orientation applied)"},
        ),
        pa.field(
            "height",
            pa.int32(),
            nullable=False,
            metadata={"doc": "original image height in pixels, upright (EXIF orientation applied)"},
        ),
        pa.field("sample_json", pa.string(), metadata={"doc": "the sample's 'json' member, verbatim, null if absent"}),
        pa.field("run_id", pa.string(), nullable=False, metadata={"doc": "id of the run that wrote the row"}),
    ],
    metadata={"schema": "cdam.metadata/1"},
)

ERRORS_SCHEMA = pa.schema(
    [
        pa.field("shard", pa.string(), nullable=False),
        pa.field("shard_index", pa.int32(), nullable=False),
        pa.field(
            "key", pa.string(), metadata={"doc": "null for a shard-level problem (truncated tar, unreadable object)"}
        ),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
    ],
    metadata={"schema": "cdam.errors/1"},
)

MEMBERS_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False, metadata={"doc": "WebDataset __key__ of the sample"}),
        pa.field(
            "member", pa.string(), nullable=False, metadata={"doc": "name of the tar member (a file of the sample)"}
        ),
        pa.field(
            "offset", pa.int64(), nullable=False, metadata={"doc": "byte offset of the member's data in the shard file"}
        ),
        pa.field("size", pa.int64(), nullable=False, metadata={"doc": "bytes of the member's data"}),
    ],
    metadata={"schema": "cdam.members/1"},
)

DERIVED_METADATA_SCHEMA = pa.schema(
    [
        *SAMPLE_FIELDS,
        pa.field(
            "row",
            pa.int64(),
            nullable=False,
            metadata={"doc": "index along the Zarr 'image' axis (of derived/NAME/cdam too)"},
        ),
        pa.field(
            "targets",
            pa.list_(pa.int32()),
            nullable=False,
            metadata={"doc": "class of each derived slot, -1 for concepts"},
        ),
        *SLOT_SUMMARY_FIELDS,
    ],
    metadata={"schema": "cdam.derived-metadata/1"},
)
