"""Joining a Ray cluster (or starting a local Ray on 127.0.0.1): shared by the job's driver and the reading
commands that run their work as Ray tasks (``cdam_worker/reading/cluster.py``)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager

_connecting = threading.Lock()  # held while ray.init runs: a second connect() waits for it, then finds Ray up
_disconnected = threading.Event()  # set by disconnect(): the thread that started a local Ray may end


def connected() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def disconnect() -> None:
    """Shut down the local Ray this process started (or leave the cluster it joined), if connected."""
    if connected():
        sys.modules["ray"].shutdown()
    _disconnected.set()


def connect(address: str | None) -> None:
    """Join the cluster at ``address`` (default: RAY_ADDRESS), else start a local Ray on 127.0.0.1.

    Safe to call from several threads: while one connects (see :class:`Connection`), the others wait.
    """
    with _connecting:
        _connect(address)


def _connect(address: str | None) -> bool:
    """Connect unless connected; whether this call started (or joined) Ray."""
    import ray

    if connected():
        return False
    _disconnected.clear()
    address = address or os.environ.get("RAY_ADDRESS")
    sigterm_handler = signal.getsignal(signal.SIGTERM)
    with _quiet_notices():
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=True)
    if sigterm_handler is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, sigterm_handler)  # ray.init's own handler exits silently with status 15
    return True


class Connection:
    """One command's use of Ray: joined (or a local Ray started) on a thread of its own from the moment the
    command begins, so the process goes on importing torch and planning meanwhile; :meth:`close` ends it,
    leaving alone a Ray this process was connected to before.

    ``background`` False begins nothing (``--dry-run``: Ray starts only if planning needs it). The thread
    that started a local Ray stays alive, idle, until :func:`disconnect`: Ray's node processes are started
    with Linux's parent-death signal, which fires when the *thread* that started them ends.
    """

    def __init__(self, address: str | None, background: bool = True) -> None:
        self.address = address
        self.was_connected = connected()
        self.began = time.time()
        self.up_at: float | None = None  # when Ray was up (None: not yet, or not begun)
        self.ready: Future[None] = Future()
        self._sigterm_handler = signal.getsignal(signal.SIGTERM) if background and not self.was_connected else None
        if background and not self.was_connected:
            threading.Thread(target=self._run, name="ray-connect", daemon=True).start()
        else:
            self.ready.set_result(None)

    def wait(self) -> None:
        """Block until Ray is up (raises what ``ray.init`` raised). Called from the main thread, it then puts back
        the SIGTERM handler the process had: joining Ray installs a native one (a stack trace, then an abort) that
        only the main thread can replace."""
        self.ready.result()
        if self._sigterm_handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._sigterm_handler)
            self._sigterm_handler = None

    def close(self) -> None:
        """Shut down the local Ray this command started (or leave the cluster it joined) now, not at the
        interpreter's exit; a connection still starting is waited for first (a refused setting stops the
        command before it needs Ray), so no Ray is left behind."""
        if self.was_connected:
            return
        with contextlib.suppress(Exception):  # a Ray that failed to start has nothing to shut down
            self.ready.result()
        disconnect()

    def _run(self) -> None:
        try:
            with _connecting:
                started = _connect(self.address)
        except BaseException as error:  # noqa: BLE001 - raised where the connection is waited for
            self.ready.set_exception(error)
            return
        self.up_at = time.time()
        self.ready.set_result(None)
        if started:
            _disconnected.wait()  # keep Ray's node processes alive until disconnect(): see above


class _NoticeFilter(logging.Filter):
    """Drops Ray's notices that are not the user's business: a local Ray started (the run's summary says how
    long it took), a new local cluster uses token authentication (it does, and nothing is to be done), and Ray
    set no SIGTERM handler when started off the main thread (``cdam`` handles SIGTERM itself)."""

    NOTICES = (
        "Started a local Ray instance",  # the summary's phases line says how long it took
        "Token authentication is enabled for this Ray cluster",
        "SIGTERM handler is not set because current thread is not the main thread",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.NOTICES)


@contextmanager
def _quiet_notices() -> Iterator[None]:
    """While Ray starts or is joined: token authentication stays on (other users of the machine cannot join a
    local Ray), but Ray's notices of :class:`_NoticeFilter` are not printed."""
    loggers = [
        logging.getLogger(name)
        for name in ("ray._private.authentication.authentication_token_setup", "ray._private.worker")
    ]
    quiet = _NoticeFilter()
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)
