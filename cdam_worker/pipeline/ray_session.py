"""The driver's Ray session: joining a cluster (or starting a local Ray), the progress counter its actors
feed, and one-line reasons for failed Ray calls."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from cdam_worker.storage import redact


def connected() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def disconnect() -> None:
    """Shut down the local Ray this process started (or leave the cluster it joined), if connected."""
    if connected():
        sys.modules["ray"].shutdown()


def connect(address: str | None) -> None:
    """Join the cluster at ``address`` (default: RAY_ADDRESS), else start a local Ray on 127.0.0.1."""
    import ray

    if connected():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    sigterm_handler = signal.getsignal(signal.SIGTERM)
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        with _quiet_token_notice():
            ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=True)
    if sigterm_handler is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, sigterm_handler)  # ray.init's own handler exits silently with status 15


class _TokenNoticeFilter(logging.Filter):
    """Drops Ray's notice that a new local cluster uses token authentication (it does, and nothing is to be done)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


@contextmanager
def _quiet_token_notice() -> Iterator[None]:
    """While the local Ray starts: its token authentication stays on (other users of the machine cannot join it),
    but its notice ("Set RAY_AUTH_MODE=disabled to opt out") is not the user's business here."""
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    quiet = _TokenNoticeFilter()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


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
