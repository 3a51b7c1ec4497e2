"""Where a run's seconds went: the driver's phases one after another, and what started in the background
(Ray, the actors) beside them; printed in the run's summary and kept in the manifest's ``timings``."""

from __future__ import annotations

import time


class PhaseClock:
    """Timestamps the driver records as it goes; :meth:`phases` turns them into seconds per phase.

    ``process_started`` (the ``cdam explain`` process's start) adds the start-up before the driver was called:
    Python and the imports.
    """

    def __init__(self, process_started: float | None) -> None:
        self.begun = time.time()
        self.process_started = process_started
        self.marks: dict[str, float] = {}
        self.background: dict[str, float] = {}

    def planned(self) -> None:
        self.marks["planned"] = time.time()

    def explained(self) -> None:
        self.marks["explained"] = time.time()

    def finished(self) -> None:
        self.marks["finished"] = time.time()

    def shut_down(self) -> None:
        self.marks["shut_down"] = time.time()

    def ray_up(self, began: float, up_at: float | None) -> None:
        """Ray was started (or joined) in the background from ``began`` to ``up_at`` (None: it was up already)."""
        if up_at is not None:
            self.background["ray"] = up_at - began

    def actors(self, asked_at: float, first_ready: float | None) -> None:
        """The actors were asked for at ``asked_at``; the first was ready at ``first_ready`` (the first pool only)."""
        if first_ready is not None and "first_ready" not in self.marks:
            self.background["actors"] = first_ready - asked_at
            self.marks["first_ready"] = first_ready

    def phases(self) -> dict[str, float]:
        """Seconds per phase, rounded to milliseconds: ``start-up`` (before the driver), ``planning``,
        ``waiting_for_actors`` (after planning, until the first actor was ready), ``explaining`` (from then until
        the last shard was written), ``finishing`` (the duplicate-key check, the manifest), ``shutdown``, and in
        the background ``ray`` (starting or joining it) and ``actors`` (asked for until the first was ready)."""
        marks = self.marks
        planned = marks.get("planned", self.begun)
        first_ready = marks.get("first_ready", planned)
        spans = {
            "start-up": (self.process_started, self.begun),
            "planning": (self.begun, marks.get("planned")),
            "waiting_for_actors": (planned, max(first_ready, planned)),
            "explaining": (max(first_ready, planned), marks.get("explained")),
            "finishing": (marks.get("explained"), marks.get("finished")),
            "shutdown": (marks.get("finished"), marks.get("shut_down")),
        }
        seconds = {name: end - start for name, (start, end) in spans.items() if start is not None and end is not None}
        seconds.update(self.background)
        return {name: round(value, 3) for name, value in seconds.items()}

    def line(self) -> str:
        """The phases as one line of the run's summary."""
        phases = self.phases()
        driver = [f"{name.replace('_', ' ')} {phases[name]:.1f} s" for name in phases if name not in self.background]
        background = [f"{name if name != 'ray' else 'Ray'} {value:.1f} s" for name, value in self.background.items()]
        return "phases: " + ", ".join(driver) + (f" (in the background: {', '.join(background)})" if background else "")
