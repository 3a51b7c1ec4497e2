"""Maps of any class or concept derived from a run's stored relevance basis, later and without the model.

``derive_maps(run, ...)`` returns them as an xarray DataArray; ``write_derived`` writes them
into the run as ``derived/NAME`` (``cdam derive``), and ``verify_derived`` checks what it wrote (``cdam verify``).
The names are imported when first used, so that ``cdam verify`` does not import the maths (torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "DerivePlan": "compute",
    "DerivedRows": "compute",
    "basis_class_maps": "compute",
    "derive_maps": "compute",
    "derive_rows": "compute",
    "plan_derive": "compute",
    "DerivedSummary": "store",
    "check_name": "store",
    "verify_derived": "store",
    "write_derived": "store",
}

__all__ = [  # the same names as _EXPORTS, spelled out for linters and type checkers
    "DerivePlan",
    "DerivedRows",
    "DerivedSummary",
    "basis_class_maps",
    "check_name",
    "derive_maps",
    "derive_rows",
    "plan_derive",
    "verify_derived",
    "write_derived",
]

if TYPE_CHECKING:
    from cdam_worker.derive.compute import (
        DerivedRows,
        DerivePlan,
        basis_class_maps,
        derive_maps,
        derive_rows,
        plan_derive,
    )
    from cdam_worker.derive.store import DerivedSummary, check_name, verify_derived, write_derived


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cdam_worker.derive' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"cdam_worker.derive.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
