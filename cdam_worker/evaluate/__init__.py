"""The paper's benchmarks of a run's maps (spec section 5): ``metrics`` (pure numpy measures), ``perturb``
(token ablation, deletion and input x gradient with the model), ``benchmark`` (``cdam evaluate``)."""

from cdam_worker.evaluate.benchmark import EvaluateSettings, Evaluation, evaluate_run, format_summary, methods_of, write_evaluation

__all__ = ["EvaluateSettings", "Evaluation", "evaluate_run", "format_summary", "methods_of", "write_evaluation"]
