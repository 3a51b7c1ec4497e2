"""cdam_worker: CDAM for whole image datasets.

Data flow: WebDataset shards in (``data``), maps computed (``engine``), arrays and tables out (``sinks``);
a finished run is read back through ``open_run`` (``reading``).
"""

from cdam_worker.maps.engine import CDAMExplainer, CDAMResult, VariantConfig
from cdam_worker.maps.model import LoadedModel, ModelLoadError, load_model, save_checkpoint
from cdam_worker.reading import Run, RunError, open_run
from cdam_worker.maps.targets import Concept, TargetSpec

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
