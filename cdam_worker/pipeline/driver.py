"""The driver of ``cdam explain`` as a library call: plan the run, hold the output's lock, hand the shards to a
pool of actors, complete the manifest, and summarise (``jobs/explain.py`` turns the flags into options)."""

from __future__ import annotations

import sys
import time

from cdam_worker.output_lock import LockRenewal, OutputLock
from cdam_worker.pipeline import ray_session
from cdam_worker.pipeline.duplicate_keys import shards_to_refuse_again
from cdam_worker.pipeline.plan import ExplainOptions, Plan, make_plan, print_plan
from cdam_worker.pipeline.run_output import collect_markers, finish_manifest, prepare_output, run_complete
from cdam_worker.pipeline.scheduler import ShardScheduler
from schemas.manifest import ShardSummary


def explain(options: ExplainOptions) -> int:
    """Run (or resume) the job ``options`` describe; prints a summary and returns the exit status:
    0 when every shard is complete and accounted for, 1 otherwise (or, with ``strict``, when any sample failed).

    Raises ConfigError for a bad setting (before any work), JobError, OutputInUseError or OutputLockLost
    when the job cannot go on; shards finished before that are kept, and rerunning resumes.
    """
    started = time.time()
    ray_was_connected = ray_session.connected()  # planning may start Ray (to count samples on the cluster)
    plan = make_plan(options)
    if options.dry_run:
        print_plan(plan)
        if not ray_was_connected:
            ray_session.disconnect()
        return 0
    lock = OutputLock(plan.storage, plan.config.run_id)
    lock.acquire()
    renewal = LockRenewal(lock)
    try:
        todo = prepare_output(plan, overwrite=options.overwrite)
        failures = ShardScheduler(plan, options, renewal.check).run(todo) if todo else {}
        if not failures and (todo or not run_complete(plan)):  # cross-shard duplicate keys, from the written tables
            redo = shards_to_refuse_again(plan, options.address)
            failures = ShardScheduler(plan, options, renewal.check).run(redo) if redo else {}
        summaries = collect_markers(plan)
        renewal.check()
        if not failures and len(summaries) == len(plan.shards):
            finish_manifest(plan, summaries)
    finally:
        if not ray_was_connected:  # the Ray this job started (or joined) goes now, not at the interpreter's exit
            ray_session.disconnect()
        renewal.stop()
        lock.release()
    return print_summary(
        plan, summaries, failures, time.time() - started, skipped=len(plan.shards) - len(todo), strict=options.strict
    )


def print_summary(
    plan: Plan, summaries: dict[int, ShardSummary], failures: dict[int, str], seconds: float, skipped: int, strict: bool
) -> int:
    images = sum(s.n_images for s in summaries.values())
    errors = sum(s.n_errors for s in summaries.values())
    lines = [
        f"done: {images} images explained, {errors} samples in errors/, {len(summaries)}/{len(plan.shards)} shards complete ({skipped} already done before this run)",
        f"time: {seconds:.1f} s ({images / max(seconds, 1e-9):.1f} images/s overall)",
        f"output: {plan.storage.url} ({plan.storage.total_size() / 2**20:.1f} MiB)",
    ]
    for index, reason in sorted(failures.items()):
        lines.append(f"FAILED shard {plan.shards[index].name}: {reason}")
    unaccounted = [
        f"UNACCOUNTED shard {s.shard}: {problem}"
        for s in sorted(summaries.values(), key=lambda s: s.shard_index)
        if (problem := s.unaccounted())
    ]
    print("\n".join(lines + unaccounted))
    if failures or len(summaries) != len(plan.shards):
        print(
            f"error: {len(plan.shards) - len(summaries)} shard(s) not complete; rerun the same command to finish them",
            file=sys.stderr,
        )
        return 1
    if unaccounted:
        print(
            f"error: {len(unaccounted)} shard(s) do not have each sample either explained or in errors/ exactly once (see UNACCOUNTED above)",
            file=sys.stderr,
        )
        return 1
    if strict and errors:
        print(
            f"error: {errors} sample(s) could not be explained (--strict); see {plan.storage.url}/errors/",
            file=sys.stderr,
        )
        return 1
    return 0
