"""The driver's Ray session: joining a cluster (or starting a local Ray), the progress counter its actors
feed, and one-line reasons for failed Ray calls."""

from __future__ import annotations

from typing import Any

from cdam_worker.ray_connect import connect, connected, disconnect
from cdam_worker.storage import redact

__all__ = ["connect", "connected", "disconnect", "failure_reason", "progress_counter"]


def progress_counter() -> Any:
    """A counter of samples done (explained, or recorded in errors/) for the progress bar, on the driver's node: losing another node
    must not lose it (the driver would fail reading it)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(
        num_cpus=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False),
    )
    class ProgressCounter:
        def __init__(self) -> None:
            self.images = 0  # explained
            self.failed = 0  # recorded in errors/

        def add(self, images: int, failed: int = 0) -> None:
            self.images += images
            self.failed += failed

        def value(self) -> int:
            """Samples done: explained or recorded in errors/ (what the progress bar counts)."""
            return self.images + self.failed

        def explained(self) -> int:
            return self.images

    return ProgressCounter.remote()


def failure_reason(error: BaseException) -> str:
    """One line saying why a Ray call failed: the first line of what the actor raised, else Ray's last line."""
    import ray

    cause = getattr(error, "cause", None)
    if isinstance(error, ray.exceptions.RayTaskError) and isinstance(cause, Exception):
        lines = str(cause).strip().splitlines()
        return redact(f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__)[:500]
    text = str(error).strip()
    return text.splitlines()[-1] if text else type(error).__name__
