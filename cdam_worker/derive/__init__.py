"""Maps of any class or concept derived from a run's stored relevance basis, later and without the model.

``derive_maps(run, ...)`` returns them as an xarray DataArray; ``write_derived`` writes them
into the run as ``derived/NAME`` (``cdam derive``), and ``verify_derived`` checks what it wrote (``cdam verify``).
"""

from cdam_worker.derive.compute import DerivedRows, DerivePlan, basis_class_maps, derive_maps, derive_rows, plan_derive
from cdam_worker.derive.store import DerivedSummary, check_name, verify_derived, write_derived

__all__ = ["DerivePlan", "DerivedRows", "DerivedSummary", "basis_class_maps", "check_name", "derive_maps", "derive_rows", "plan_derive", "verify_derived", "write_derived"]
