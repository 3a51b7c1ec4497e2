"""The output contract of a cdam run: Arrow schemas of the Parquet tables and the Zarr layout."""

from schemas.metadata import DERIVED_METADATA_SCHEMA, ERRORS_SCHEMA, MEMBERS_SCHEMA, METADATA_SCHEMA
from schemas.zarr_layout import (
    CHUNK_ROWS,
    DERIVED_GROUP,
    HEAD_GROUP,
    INT_FILL,
    ArraySpec,
    Layout,
    array_specs,
    rows_per_shard_for,
)

__all__ = [
    "CHUNK_ROWS",
    "DERIVED_GROUP",
    "DERIVED_METADATA_SCHEMA",
    "HEAD_GROUP",
    "ERRORS_SCHEMA",
    "INT_FILL",
    "MEMBERS_SCHEMA",
    "METADATA_SCHEMA",
    "ArraySpec",
    "Layout",
    "array_specs",
    "rows_per_shard_for",
]
