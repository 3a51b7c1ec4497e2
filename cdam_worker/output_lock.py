"""The lease that keeps two writers off one output: the job's ``lock.json``, and ``locks/<task>.json`` of a
reading command that writes into a run (derive, audit)."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any

import psutil

from cdam_worker.run_files import read_json, write_json
from cdam_worker.storage import Storage, StorageError
from schemas.paths import LOCK_PATH

LOCK_LEASE_SECONDS = 120.0
LOCK_RENEW_SECONDS = 20.0  # the lease outlasts several missed renewals


class OutputInUseError(RuntimeError):
    """Another live job holds the output's lock."""


class OutputLockLost(RuntimeError):
    """Another job took the output's lock over (this job's lease had run out, e.g. its driver was paused)."""


class OutputLock:
    """A lease object at ``DEST/lock.json`` (or ``path``), created with a conditional put and renewed by its holder.

    A lock is stale (and taken over) when its lease has expired, or when its driver ran on this host
    and that process is gone (a killed driver's rerun need not wait for the lease).
    """

    def __init__(self, storage: Storage, run_id: str, path: str = LOCK_PATH) -> None:
        self.storage = storage
        self.path = path
        self.payload = {
            "run_id": run_id,
            "token": uuid.uuid4().hex,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "renewed_at": time.time(),
            "lease_seconds": LOCK_LEASE_SECONDS,
        }

    def acquire(self) -> None:
        """Take the lock or raise OutputInUseError naming the holder."""
        body = json.dumps(self.payload).encode()
        if self.storage.put_if_absent(self.path, body):
            return
        holder = read_json(self.storage, self.path) or {}
        if holder.get("token") == self.payload["token"]:
            return  # our own create went through but its answer was lost, and the retry saw it
        if self._is_stale(holder):
            self.storage.delete(self.path)
            if self.storage.put_if_absent(self.path, body):
                return
            holder = read_json(self.storage, self.path) or holder
        raise OutputInUseError(
            f"output {self.storage.url} is in use by another cdam job (run {holder.get('run_id')}, pid {holder.get('pid')} on {holder.get('host')}); "
            f"wait for it to finish, or delete {self.path} there if that job is gone"
        )

    def renew(self) -> None:
        """Extend the lease; OutputLockLost if another job holds the lock now.

        Read, compare the token, write: another job can only take over between the read and the write
        (milliseconds), instead of being silently overwritten by a driver that was paused past its lease.
        """
        holder = read_json(self.storage, self.path)
        if holder is None and self.storage.put_if_absent(self.path, json.dumps(self.payload).encode()):
            return  # deleted by hand while we ran: ours again
        holder = holder or read_json(self.storage, self.path) or {}
        if holder.get("token") != self.payload["token"]:
            raise OutputLockLost(
                f"another cdam job took over the output lock of {self.storage.url} (run {holder.get('run_id')}, "
                f"pid {holder.get('pid')} on {holder.get('host')}): this job's lease had run out or its lock was deleted"
            )
        self.payload["renewed_at"] = time.time()
        write_json(self.storage, self.path, self.payload)

    def release(self) -> None:
        """Delete the lock if it is still ours. Best effort: a lock left behind (storage failing at the end
        of a job) goes stale when its lease ends or, on this host, as soon as this process is gone."""
        try:
            holder = read_json(self.storage, self.path) or {}
            if holder.get("token") == self.payload["token"]:
                self.storage.delete(self.path)
        except StorageError:
            pass

    def _is_stale(self, holder: dict[str, Any]) -> bool:
        if not holder:
            return True
        if time.time() - float(holder.get("renewed_at", 0)) > float(holder.get("lease_seconds", LOCK_LEASE_SECONDS)):
            return True
        if holder.get("host") == self.payload["host"]:
            pid = int(holder.get("pid", -1))
            return not psutil.pid_exists(pid) or _is_zombie(pid)
        return False


def _is_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


class LockRenewal:
    """Renews the output lock every ``LOCK_RENEW_SECONDS`` in a thread, and says when another job took it over."""

    def __init__(self, lock: OutputLock) -> None:
        self.lock = lock
        self.lost: str | None = None
        self._stop = threading.Event()
        threading.Thread(target=self._renew, name="lock-renewal", daemon=True).start()

    def _renew(self) -> None:
        while not self._stop.wait(LOCK_RENEW_SECONDS):
            try:
                self.lock.renew()
            except OutputLockLost as error:
                self.lost = str(error)
                return
            except StorageError as error:  # try again next time: the lease (120 s) outlasts a few failures
                print(f"warning: could not renew the output lock: {error}", file=sys.stderr)

    def check(self) -> None:
        """OutputLockLost once the lock is lost: the job must stop writing into an output another job owns."""
        if self.lost is not None:
            raise OutputLockLost(f"{self.lost}; stopping so the two jobs do not write the same output")

    def stop(self) -> None:
        self._stop.set()
