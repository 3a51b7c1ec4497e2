"""cdam_worker: CDAM for whole image datasets.

Data flow: WebDataset shards in (``shards``), maps computed (``maps``), arrays and tables out (``pipeline``,
the Ray job that ties them together); a finished run is read back through ``open_run`` (``reading``).
See docs/architecture.md for which package owns what.
"""

from cdam_worker.maps.engine import CDAMExplainer, CDAMResult
from cdam_worker.maps.model import LoadedModel, ModelLoadError, load_model, save_checkpoint
from cdam_worker.maps.targets import Concept, TargetSpec
from cdam_worker.maps.variants import VariantConfig
from cdam_worker.reading import Run, RunError, open_run

__version__ = "0.1.0"

__all__ = [
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
