"""The paper's benchmarks of a run's maps (spec section 5): ``metrics`` (pure numpy measures), ``perturb``
(token ablation, deletion and insertion, the pixel-gradient methods), ``attention`` (rollout, Chefer et al.'s
gradient-weighted attention and relevance propagation), ``methods`` (every method's maps from a model),
``sanity`` (randomisation checks), ``robustness`` (max-sensitivity, FGSM), ``benchmark`` (``cdam evaluate``)."""

from cdam_worker.evaluate.benchmark import (
    EvaluateSettings,
    Evaluation,
    evaluate_run,
    format_summary,
    methods_of,
    write_evaluation,
)

__all__ = ["EvaluateSettings", "Evaluation", "evaluate_run", "format_summary", "methods_of", "write_evaluation"]
