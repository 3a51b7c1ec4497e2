"""Hands a run's shards to a pool of Ray actors, after ``ray.util.ActorPool``: each actor holds up to two
shards (the one it explains and the next, read and decoded meanwhile), a shard whose actor died is retried on
another, an actor that could not start is replaced (up to a budget)."""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from cdam_worker.pipeline import ray_session
from cdam_worker.pipeline.actor import SHARDS_AT_ONCE, ActorInfo
from cdam_worker.pipeline.actor_pool import ActorPool, JobError
from cdam_worker.pipeline.plan import ExplainOptions, Plan
from cdam_worker.pipeline.run_output import write_shard_failure
from cdam_worker.pipeline.settings import JobConfig, ShardTask
from cdam_worker.storage import StorageError

MAX_SHARD_ATTEMPTS = 3
MAX_START_FAILURES_PER_ACTOR = 2  # failed actor starts replaced, per actor of the pool, before giving up
STALL_SECONDS = 600  # no actor ready and none starting for this long: the cluster lacks the resources asked for


@dataclass
class ActorRecord:
    """A ready actor: what it reported when it was configured, the shards it holds (``process_shard()``
    references, in the order handed out: the first is being explained), and how many it completed."""

    info: ActorInfo
    held: list[Any] = field(default_factory=list)
    shards: int = 0


class ShardScheduler:
    """Runs shards on a pool of actors until each is done or given up on (:meth:`run`).

    State, as Ray references map to what they stand for:

    - ``starting``: ``configure()`` reference -> actor still starting or taking the job;
    - ``ready_actors``: every live, configured actor's :class:`ActorRecord`;
    - ``running``: ``process_shard()`` reference -> (actor, shard, attempt);
    - ``pending``: (shard, attempt) still to hand out; ``failures``: shard index -> why it was given up on.

    Each event ``ray.wait`` reports goes to one handler: :meth:`on_actor_ready`, :meth:`on_actor_start_failed`,
    :meth:`on_shard_done`, :meth:`on_actor_died` (the shards it held are retried on other actors, the actor
    replaced), :meth:`on_shard_failed` (the actor stays; the shard is retried). Every second :meth:`check_lock`
    runs the lock renewal's check, which raises OutputLockLost when another job took the output over.
    """

    def __init__(self, plan: Plan, options: ExplainOptions, check_lock: Callable[[], None], pool: ActorPool) -> None:
        self.plan = plan
        self.options = options
        self.check_lock = check_lock
        self.pool = pool
        self.progress = pool.progress
        self.starting: dict[Any, Any] = {}
        self.ready_actors: dict[Any, ActorRecord] = {}
        self.running: dict[Any, tuple[Any, ShardTask, int]] = {}
        self.pending: deque[tuple[ShardTask, int]] = deque()
        self.failures: dict[int, str] = {}
        self.generation = 0  # bumped for every replacement actor (fault injection acts on the first generations)
        self.start_failures = 0
        self.shards_done = 0
        self.first_ready: float | None = None  # when the first actor was ready: throughput is measured from there
        self.last_progress = time.time()

    def run(self, tasks: list[ShardTask]) -> dict[int, str]:
        """Run ``tasks`` on the pool's actors (those beyond one per task are let go, the rest are given the job,
        and all are let go at the end); returns the shards given up on, with the reason."""
        import ray

        self.model = ray.put(self.plan.loaded)  # the checked model, read by the actors from their node's object store
        self.kept = min(self.pool.size, len(tasks))  # actors that get the job (each one's decode pool is sized to them)
        for surplus in self.pool.actors[self.kept :]:
            ray.kill(surplus)
        for actor in self.pool.actors[: self.kept]:
            self._configure(actor)
        self.pending.extend((task, 1) for task in tasks)
        self.last_progress = time.time()
        total = sum(t.n_samples for t in tasks)
        bar = tqdm(total=total, desc="explaining", unit="img", file=sys.stderr, mininterval=1.0, dynamic_ncols=True)
        try:
            while self.pending or self.running:
                self._hand_out_shards()
                ready, _ = ray.wait(list(self.running) + list(self.starting), num_returns=1, timeout=1.0)
                self.check_lock()
                for ref in ready:
                    if ref in self.starting:
                        self._actor_started(ref)
                    elif ref in self.running:  # not already retried with the rest of a dead actor's shards
                        self._shard_returned(ref)
                bar.n = min(total, ray.get(self.progress.value.remote()))
                bar.set_postfix_str(f"shards {self.shards_done}/{len(tasks)}", refresh=True)
                if not self.running and self.pending and time.time() - self.last_progress > STALL_SECONDS:
                    raise JobError(
                        "no actor could be started for 10 minutes: the cluster lacks the resources asked for (--cpus-per-actor / --gpus-per-actor)"
                    )
            bar.close()
            self._report()
        finally:
            bar.close()
            for actor in [*self.ready_actors, *self.starting.values()]:
                ray.kill(actor)
        return self.failures

    # -- the pool ----------------------------------------------------------------------------------

    def _configure(self, actor: Any) -> None:
        self.starting[actor.configure.remote(self.plan.config, self.plan.layout, self.model, self.kept)] = actor

    def _start_replacement(self) -> None:
        self.generation += 1
        self._configure(self.pool.new_actor(self.generation))

    def _hand_out_shards(self) -> None:
        """Pending shards to the actors holding the fewest (up to SHARDS_AT_ONCE each): every actor gets one
        before any gets a second."""
        while self.pending:
            holding = min(self.ready_actors.items(), key=lambda item: len(item[1].held), default=None)
            if holding is None or len(holding[1].held) >= SHARDS_AT_ONCE:
                return
            actor, record = holding
            task, attempt = self.pending.popleft()
            ref = actor.process_shard.remote(task)
            self.running[ref] = (actor, task, attempt)
            record.held.append(ref)

    def _actor_started(self, ref: Any) -> None:
        import ray

        actor = self.starting.pop(ref)
        try:
            info = ray.get(ref)
        except ray.exceptions.RayError as error:  # e.g. its node was lost while it started
            self.on_actor_start_failed(error)
            return
        self.on_actor_ready(actor, info)

    def _shard_returned(self, ref: Any) -> None:
        import ray

        actor, task, attempt = self.running.pop(ref)
        try:
            ray.get(ref)
            self.on_shard_done(actor, ref)
        except ray.exceptions.RayActorError as error:
            self.on_actor_died(actor, ref, task, attempt, error)
        except ray.exceptions.RayError as error:
            self.on_shard_failed(actor, ref, task, attempt, error)
        self.last_progress = time.time()

    # -- handlers ----------------------------------------------------------------------------------

    def on_actor_ready(self, actor: Any, info: ActorInfo) -> None:
        """A new actor took the job: it joins the ready actors (JobError if it cannot decode as asked)."""
        self.ready_actors[actor] = ActorRecord(
            _checked_actor(info, self.plan.config, warned=any(r.info.cuda_missing for r in self.ready_actors.values()))
        )
        self.first_ready = self.first_ready or time.time()
        self.last_progress = time.time()

    def on_actor_start_failed(self, error: BaseException) -> None:
        """An actor could not start: replaced up to a budget, then the job goes on with the others (or stops)."""
        self.start_failures += 1
        reason = ray_session.failure_reason(error)
        if self.start_failures <= MAX_START_FAILURES_PER_ACTOR * self.pool.size:
            self._start_replacement()
            print(f"an actor could not start: {reason}; starting a replacement", file=sys.stderr)
        elif not (self.ready_actors or self.starting):
            raise JobError(f"no actor could start ({self.start_failures} attempts); the last error: {reason}") from None
        else:
            print(
                f"an actor could not start: {reason}; going on with {len(self.ready_actors) + len(self.starting)} other actor(s)",
                file=sys.stderr,
            )

    def on_shard_done(self, actor: Any, ref: Any) -> None:
        self.shards_done += 1
        record = self.ready_actors[actor]
        record.shards += 1
        record.held.remove(ref)

    def on_actor_died(self, actor: Any, ref: Any, task: ShardTask, attempt: int, error: BaseException) -> None:
        """The actor is gone (its process or node died): a replacement starts, and every shard it held is
        retried; the attempt counts against the one it was explaining (the first handed out), not the next."""
        held = self.ready_actors.pop(actor).held
        self._start_replacement()
        reason = f"actor died: {ray_session.failure_reason(error)}"
        (current, current_attempt), *waiting = [(task, attempt) if r == ref else self.running.pop(r)[1:] for r in held]
        for waited, its_attempt in reversed(waiting):
            print(f"shard {waited.name}: {reason} before its turn; retrying", file=sys.stderr)
            self.pending.appendleft((waited, its_attempt))
        self._retry_or_fail(current, current_attempt, reason)

    def on_shard_failed(self, actor: Any, ref: Any, task: ShardTask, attempt: int, error: BaseException) -> None:
        """The shard raised in a live actor: the actor takes other work, the shard is retried."""
        self.ready_actors[actor].held.remove(ref)
        self._retry_or_fail(task, attempt, ray_session.failure_reason(error))

    def _retry_or_fail(self, task: ShardTask, attempt: int, reason: str) -> None:
        if attempt < MAX_SHARD_ATTEMPTS:
            print(
                f"shard {task.name}: {reason}; retrying (attempt {attempt + 1} of {MAX_SHARD_ATTEMPTS})",
                file=sys.stderr,
            )
            self.pending.append((task, attempt + 1))
            return
        self.failures[task.shard_index] = reason
        try:
            write_shard_failure(self.plan, task, f"shard failed after {MAX_SHARD_ATTEMPTS} attempts: {reason}")
        except StorageError as error:  # the summary still reports the shard; the job goes on with the others
            print(f"warning: could not record the failure of shard {task.name} in errors/: {error}", file=sys.stderr)

    def _report(self) -> None:
        """Throughput since the first actor was ready, and one line per actor of the pool at the end."""
        import ray

        explained = ray.get(self.progress.explained.remote())
        seconds = time.time() - (self.first_ready or time.time())
        print(
            f"actors: {len(self.ready_actors)} at the end; {explained} images in {seconds:.1f} s since the first actor was ready ({explained / max(seconds, 1e-9):.1f} images/s)",
            file=sys.stderr,
        )
        actors = list(self.ready_actors)
        for number, (actor, peak) in enumerate(
            zip(actors, ray.get([actor.peak_rss_mib.remote() for actor in actors])), 1
        ):
            record = self.ready_actors[actor]
            info = record.info
            print(
                f"actor {number}: node {info.node[:12]}, {info.device}, decode {info.decode} with {info.decode_workers} worker(s), batch {info.batch_size}, {record.shards} shard(s), peak RSS {peak:.0f} MiB",
                file=sys.stderr,
            )


def _checked_actor(info: ActorInfo, config: JobConfig, warned: bool) -> ActorInfo:
    """An actor's ActorInfo, once it is ready; JobError when it cannot decode as asked. Says once (unless
    ``warned``: an earlier actor said it) that actors given a GPU found no usable CUDA and run on the CPU."""
    if config.decode == "gpu" and info.decode != "gpu":
        raise JobError(
            f"--decode gpu needs CUDA, but an actor on node {info.node[:12]} has none (torch.cuda.is_available() is False there); use --decode cpu"
        )
    if info.cuda_missing and not warned:
        print(
            "warning: actors hold a GPU of the Ray cluster but CUDA is not usable on their node (torch.cuda.is_available() is False); they compute on the CPU",
            file=sys.stderr,
        )
    return info
