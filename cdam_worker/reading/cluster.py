"""Run a reading command's units of work (a shard to derive, a batch to evaluate, a class to audit) here, one
after the other, or as Ray tasks on the cluster that ``--address`` or RAY_ADDRESS names.

A unit function takes ``(unit, run, shared)`` and returns its result; here it gets the driver's run, as a
task it opens the run itself (``open_run`` of its url, a folder or s3://) and writes only its own objects. The driver gets the results in the units' order, whatever order the tasks
finish in, so the outputs it merges are the same bytes either way; it calls ``check`` (the run lock's check)
at least every ``CHECK_SECONDS`` while it waits.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from cdam_worker.ray_connect import connect
from cdam_worker.reading.run import Run, open_run

Unit = TypeVar("Unit")
Result = TypeVar("Result")
CHECK_SECONDS = 5.0


def cluster_address(address: str | None) -> str | None:
    """The Ray cluster to run on: ``address`` (``--address``), else RAY_ADDRESS; None (or empty): run here."""
    return address or os.environ.get("RAY_ADDRESS") or None


def run_units(
    function: Callable[[Unit, Run, Any], Result],
    units: Sequence[Unit],
    run: Run,
    shared: Any = None,
    *,
    done: Callable[[Result], None] = lambda _result: None,
    **where: Any,
) -> list[Result]:
    """``function(unit, run, shared)`` for every unit, the results in the units' order; ``done`` sees each
    result as it comes (a progress bar); ``where``: ``address`` and ``check``, as for ``each_result``."""
    results: list[Any] = [None] * len(units)
    for position, result in each_result(function, units, run, shared, **where):
        results[position] = result
        done(result)
    return results


def each_result(
    function: Callable[[Unit, Run, Any], Result],
    units: Sequence[Unit],
    run: Run,
    shared: Any = None,
    *,
    address: str | None = None,
    check: Callable[[], None] = lambda: None,
) -> Iterator[tuple[int, Result]]:
    """(position of the unit, ``function(unit, run, shared)``) for every unit as it is done: here one after the
    other, in order, or as Ray tasks (one CPU each, spread over the nodes) on the cluster at
    ``cluster_address(address)``, in the order they finish; a caller that consumes each result at once never
    holds them all."""
    if cluster_address(address) is None:
        for position, unit in enumerate(units):
            yield position, function(unit, run, shared)
            check()
        return
    yield from _as_tasks(function, units, run.url, shared, cluster_address(address), check)


def _as_tasks(
    function: Callable[[Unit, Run, Any], Result],
    units: Sequence[Unit],
    url: str,
    shared: Any,
    address: str,
    check: Callable[[], None],
) -> Iterator[tuple[int, Result]]:
    import ray

    connect(address)
    remote = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(_in_task)  # the reading spread over the nodes
    shared_ref = ray.put(shared)
    position = {remote.remote(function, url, unit, shared_ref): i for i, unit in enumerate(units)}
    pending = list(position)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=CHECK_SECONDS)
            for ref in ready:
                yield position.pop(ref), _get(ref)
            check()
    finally:
        for ref in pending:  # a failed unit (or a lost lock): the others stop too
            ray.cancel(ref)


def _in_task(function: Callable[[Unit, Run, Any], Result], url: str, unit: Unit, shared: Any) -> Result:
    """One unit as a Ray task: the run opened here, by its url."""
    return function(unit, open_run(url), shared)


def _get(ref: Any) -> Any:
    """The task's result, the driver's own (writable) copy; what the task raised is raised here as itself (a
    RunError keeps its one line)."""
    import ray

    try:
        return copy.deepcopy(ray.get(ref))
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, Exception):
            raise error.cause from None
        raise
