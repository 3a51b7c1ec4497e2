"""Maps of any class or concept derived from a run's stored relevance basis, later and without the model.

``derive_maps(run, ...)`` returns them as an xarray DataArray; ``write_derived`` writes them
into the run as ``derived/NAME`` (``cdam derive``), and ``verify_derived`` checks what it wrote (``cdam verify``).
The names are imported when first used, so that ``cdam verify`` does not import the maths (torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cdam_worker.lazy_exports import lazy_exports

_EXPORTS = {
    "DerivePlan": "cdam_worker.derive.compute",
    "DerivedRows": "cdam_worker.derive.compute",
    "basis_class_maps": "cdam_worker.derive.compute",
    "derive_maps": "cdam_worker.derive.compute",
    "derive_rows": "cdam_worker.derive.compute",
    "plan_derive": "cdam_worker.derive.compute",
    "DerivedSummary": "cdam_worker.derive.store",
    "check_name": "cdam_worker.derive.store",
    "verify_derived": "cdam_worker.derive.store",
    "write_derived": "cdam_worker.derive.store",
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


__getattr__ = lazy_exports(__name__, _EXPORTS)
