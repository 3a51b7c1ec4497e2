"""Joining a Ray cluster (or starting a local Ray on 127.0.0.1): shared by the job's driver and the reading
commands that run their work as Ray tasks (``cdam_worker/reading/cluster.py``)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager


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
