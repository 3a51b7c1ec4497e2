"""The driver of ``cdam explain`` as a library call: plan the run, hold the output's lock, hand the shards to a
pool of actors, complete the manifest, and summarise (``jobs/explain.py`` turns the flags into options)."""

from __future__ import annotations

import sys
import time
from concurrent.futures import Future, wait

from cdam_worker.output_lock import LockRenewal, OutputLock
from cdam_worker.pipeline.actor_pool import ActorPool, start_actor_pool
from cdam_worker.pipeline.duplicate_keys import shards_to_refuse_again
from cdam_worker.pipeline.phases import PhaseClock
from cdam_worker.pipeline.plan import ExplainOptions, Plan, make_plan, plan_shards, print_plan
from cdam_worker.pipeline.run_output import collect_markers, finish_manifest, prepare_output, run_complete
from cdam_worker.pipeline.scheduler import ShardScheduler
from cdam_worker.pipeline.settings import ShardTask
from cdam_worker.ray_connect import Connection
from schemas.manifest import ShardSummary


def explain(options: ExplainOptions, connection: Connection | None = None) -> int:
    """Run (or resume) the job ``options`` describe; prints a summary and returns the exit status:
    0 when every shard is complete and accounted for, 1 otherwise (or, with ``strict``, when any sample failed).

    Start-up overlaps: Ray is joined in the background from the start (``connection``, begun by ``cdam explain``
    before it imported torch; else here), and the actors start as soon as the shards are known, while the
    model is loaded and checked. Each phase's time is printed and kept in the manifest.

    Raises ConfigError for a bad setting (before any shard is explained), JobError, OutputInUseError or
    OutputLockLost when the job cannot go on; shards finished before that are kept, and rerunning resumes.
    """
    clock = PhaseClock(options.started_at)
    connection = connection or Connection(options.address, background=not options.dry_run)
    lock: OutputLock | None = None
    renewal: LockRenewal | None = None
    pool: Future[ActorPool] | None = None
    try:
        shards = plan_shards(options)
        pool = None if options.dry_run else start_actor_pool(options, len(shards.urls))
        plan = make_plan(options, shards)
        clock.planned()
        connection.wait()
        if options.dry_run:
            print_plan(plan)
            return 0
        lock = OutputLock(plan.storage, plan.config.run_id)
        lock.acquire()
        renewal = LockRenewal(lock)
        todo = prepare_output(plan, overwrite=options.overwrite)
        failures = _explain_shards(plan, options, renewal, pool.result(), todo, clock) if todo else {}
        clock.explained()
        already_complete = not todo and run_complete(plan)  # a rerun of a complete run changes nothing
        if not failures and not already_complete:  # cross-shard duplicate keys, from the written tables
            redo = shards_to_refuse_again(plan, options.address)
            if redo:
                failures = _explain_shards(
                    plan, options, renewal, start_actor_pool(options, len(redo)).result(), redo, clock
                )
        summaries = collect_markers(plan)
        renewal.check()
        clock.ray_up(connection.began, connection.up_at)
        if not failures and len(summaries) == len(plan.shards) and not already_complete:
            finish_manifest(plan, summaries, clock.phases())
    finally:
        clock.finished()
        if pool is not None:  # asking for the actors is over before Ray goes (a refused setting stops sooner)
            wait([pool])
        connection.close()
        clock.shut_down()
        if renewal is not None:
            renewal.stop()
        if lock is not None:
            lock.release()
    return print_summary(
        plan,
        summaries,
        failures,
        clock,
        skipped=len(plan.shards) - len(todo),
        strict=options.strict,
    )


def _explain_shards(
    plan: Plan,
    options: ExplainOptions,
    renewal: LockRenewal,
    pool: ActorPool,
    tasks: list[ShardTask],
    clock: PhaseClock,
) -> dict[int, str]:
    scheduler = ShardScheduler(plan, options, renewal.check, pool)
    try:
        return scheduler.run(tasks)
    finally:
        clock.actors(pool.asked_at, scheduler.first_ready)


def print_summary(
    plan: Plan,
    summaries: dict[int, ShardSummary],
    failures: dict[int, str],
    clock: PhaseClock,
    skipped: int,
    strict: bool,
) -> int:
    images = sum(s.n_images for s in summaries.values())
    errors = sum(s.n_errors for s in summaries.values())
    seconds = time.time() - (clock.process_started or clock.begun)
    lines = [
        f"done: {images} images explained, {errors} samples in errors/, {len(summaries)}/{len(plan.shards)} shards complete ({skipped} already done before this run)",
        f"time: {seconds:.1f} s ({images / max(seconds, 1e-9):.1f} images/s overall)",
        clock.line(),
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
