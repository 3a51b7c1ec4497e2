"""cdam_worker: CDAM for whole image datasets.

Data flow: WebDataset shards in (``shards``), maps computed (``maps``), arrays and tables out (``pipeline``,
the Ray job that ties them together); a finished run is read back through ``open_run`` (``reading``).
See docs/architecture.md for which package owns what.

The names below are imported when first used (PEP 562), so that ``import cdam_worker.reading`` and the
reading commands do not pay for torch and timm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cdam_worker.lazy_exports import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "CDAMExplainer": "cdam_worker.maps.engine",
    "CDAMResult": "cdam_worker.maps.engine",
    "Concept": "cdam_worker.maps.targets",
    "LoadedModel": "cdam_worker.maps.model",
    "ModelLoadError": "cdam_worker.maps.model",
    "Run": "cdam_worker.reading",
    "RunError": "cdam_worker.reading",
    "TargetSpec": "cdam_worker.maps.targets",
    "VariantConfig": "cdam_worker.maps.variants",
    "load_model": "cdam_worker.maps.model",
    "open_run": "cdam_worker.reading",
    "save_checkpoint": "cdam_worker.maps.model",
}

__all__ = [  # the same names as _EXPORTS, spelled out for linters and type checkers
    "CDAMExplainer",
    "CDAMResult",
    "Concept",
    "LoadedModel",
    "ModelLoadError",
    "Run",
    "RunError",
    "TargetSpec",
    "VariantConfig",
    "load_model",
    "open_run",
    "save_checkpoint",
    "__version__",
]

if TYPE_CHECKING:
    from cdam_worker.maps.engine import CDAMExplainer, CDAMResult
    from cdam_worker.maps.model import LoadedModel, ModelLoadError, load_model, save_checkpoint
    from cdam_worker.maps.targets import Concept, TargetSpec
    from cdam_worker.maps.variants import VariantConfig
    from cdam_worker.reading import Run, RunError, open_run


__getattr__ = lazy_exports(__name__, _EXPORTS)
