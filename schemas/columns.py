"""How the contract's tables spell a column: its name, Arrow type, whether it may be null, and what it holds."""

from __future__ import annotations

import pyarrow as pa


def column(name: str, type_: pa.DataType, doc: str | None = None, *, required: bool = False) -> pa.Field:
    """One column; ``required`` columns are never null, ``doc`` (the field's metadata) says what it holds."""
    return pa.field(name, type_, nullable=not required, metadata=None if doc is None else {"doc": doc})


def columns(type_: pa.DataType, *names: str, required: bool = False) -> list[pa.Field]:
    """Undocumented columns of one type, in order (schemas/README.md describes them)."""
    return [column(name, type_, required=required) for name in names]
