"""Fault injection for the reliability tests: the one seam through which they make actors fail or wait.

A job runs with :data:`NO_FAULTS` unless its caller passes other :class:`Faults` (``ExplainOptions.faults``);
``cdam explain`` reads them from the ``CDAM_FAULT_*`` variables below, which only tests set.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

EXIT_AFTER_BATCHES_ENV = "CDAM_FAULT_EXIT_AFTER_BATCHES"  # first-generation actors exit hard after N batches written
FAIL_START_ENV = "CDAM_FAULT_FAIL_START"  # actors of the first N generations fail in __init__
HOLD_ENV = "CDAM_FAULT_HOLD_WHILE_EXISTS"  # actors wait before each batch while this file exists


@dataclass(frozen=True)
class Faults:
    """What an actor does wrong on purpose. ``generation`` counts replacement actors (0: the first pool)."""

    exit_after_batches: int | None = None  # actors of generation 0 exit hard (like a preempted node) after N batches
    fail_start_generations: int = 0  # actors of generations below this raise in their constructor
    hold_while_exists: str | None = None  # actors wait before each batch while this file exists

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Faults:
        """The faults the ``CDAM_FAULT_*`` variables ask for (none when they are unset or empty)."""
        exit_after = environ.get(EXIT_AFTER_BATCHES_ENV)
        return cls(
            int(exit_after) if exit_after else None,
            int(environ.get(FAIL_START_ENV) or 0),
            environ.get(HOLD_ENV) or None,
        )

    def at_start(self, generation: int) -> None:
        if self.fail_start_generations > generation:
            raise RuntimeError(f"fault injection: an actor of generation {generation} fails to start")

    def before_batch(self) -> None:
        if self.hold_while_exists:
            _wait_while_exists(self.hold_while_exists)

    def after_batch(self, generation: int, batches_done: int) -> None:
        if self.exit_after_batches is not None and generation == 0 and batches_done >= self.exit_after_batches:
            os._exit(1)  # die like a preempted node: no cleanup, no exception the actor could report


NO_FAULTS = Faults()


def _wait_while_exists(path: str) -> None:
    """Hold: announce the wait with a ``<path>.<pid>`` file, then wait for ``path`` to go."""
    announce = f"{path}.{os.getpid()}"
    if os.path.exists(path):
        open(announce, "w").close()
    while os.path.exists(path):
        time.sleep(0.05)
