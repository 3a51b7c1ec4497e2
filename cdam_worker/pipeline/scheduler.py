"""Hands a run's shards to a pool of Ray actors, after ``ray.util.ActorPool``: idle actors get the next shard,
a shard whose actor died is retried on another, an actor that could not start is replaced (up to a budget)."""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from cdam_worker.pipeline import ray_session
from cdam_worker.pipeline.actor import ActorInfo, make_actor_class
from cdam_worker.pipeline.plan import ExplainOptions, Plan
from cdam_worker.pipeline.run_output import write_shard_failure
from cdam_worker.pipeline.settings import JobConfig, ShardTask
from cdam_worker.storage import StorageError

MAX_SHARD_ATTEMPTS = 3
MAX_START_FAILURES_PER_ACTOR = 2  # failed actor starts replaced, per actor of the pool, before giving up
STALL_SECONDS = 600  # no actor ready and none starting for this long: the cluster lacks the resources asked for


class JobError(RuntimeError):
    """The job could not go on (no actor could start, or another job took the output's lock over)."""


@dataclass
class ActorRecord:
    """A ready actor: what it reported when it started, and how many shards it completed."""

    info: ActorInfo
    shards: int = 0


class ShardScheduler:
    """Runs shards on a pool of actors until each is done or given up on (:meth:`run`).

    State, as Ray references map to what they stand for:

    - ``starting``: ``ready()`` reference -> actor still loading its model;
    - ``idle``: ready actors without a shard; ``ready_actors``: every ready actor's :class:`ActorRecord`;
    - ``running``: ``process_shard()`` reference -> (actor, shard, attempt);
    - ``pending``: (shard, attempt) still to hand out; ``failures``: shard index -> why it was given up on.

    Each event ``ray.wait`` reports goes to one handler: :meth:`on_actor_ready`, :meth:`on_actor_start_failed`,
    :meth:`on_shard_done`, :meth:`on_actor_died` (the shard is retried on another actor, the actor replaced),
    :meth:`on_shard_failed` (the actor stays; the shard is retried). Every second :meth:`check_lock` runs the
    lock renewal's check, which raises OutputLockLost when another job took the output over.
    """

    def __init__(self, plan: Plan, options: ExplainOptions, check_lock: Callable[[], None]) -> None:
        self.plan = plan
        self.options = options
        self.check_lock = check_lock
        self.starting: dict[Any, Any] = {}
        self.idle: list[Any] = []
        self.ready_actors: dict[Any, ActorRecord] = {}
        self.running: dict[Any, tuple[Any, ShardTask, int]] = {}
        self.pending: deque[tuple[ShardTask, int]] = deque()
        self.failures: dict[int, str] = {}
        self.generation = 0  # bumped for every replacement actor (fault injection acts on the first generations)
        self.start_failures = 0
        self.shards_done = 0
        self.first_ready: float | None = (
            None  # when the first actor was ready: the job's throughput is measured from there
        )
        self.last_progress = time.time()

    def run(self, tasks: list[ShardTask]) -> dict[int, str]:
        """Run ``tasks`` on a new pool of actors; returns the shards given up on, with the reason."""
        import ray

        self._start_pool(len(tasks))
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
                    else:
                        self._shard_returned(ref)
                bar.n = min(total, ray.get(self.progress.value.remote()))
                bar.set_postfix_str(f"shards {self.shards_done}/{len(tasks)}", refresh=True)
                if (
                    not self.running
                    and not self.idle
                    and self.pending
                    and time.time() - self.last_progress > STALL_SECONDS
                ):
                    raise JobError(
                        "no actor could be started for 10 minutes: the cluster lacks the resources asked for (--cpus-per-actor / --gpus-per-actor)"
                    )
        finally:
            bar.close()
        self._report()
        return self.failures

    # -- the pool ----------------------------------------------------------------------------------

    def _start_pool(self, n_tasks: int) -> None:
        import ray

        options = self.options
        ray_session.connect(options.address)
        gpus = float(ray.cluster_resources().get("GPU", 0))
        self.use_gpu = gpus > 0 and options.gpus_per_actor > 0
        if self.plan.config.decode == "gpu" and not self.use_gpu:
            raise JobError(
                "--decode gpu needs actors with a GPU, but the Ray cluster has no GPU (or --gpus-per-actor is 0); use --decode cpu"
            )
        self.n_actors = options.actors or (
            max(1, int(gpus // options.gpus_per_actor))
            if self.use_gpu
            else max(1, int(ray.cluster_resources().get("CPU", 1) // options.cpus_per_actor))
        )
        self.n_actors = min(self.n_actors, n_tasks)
        self.actor_class = make_actor_class(options.cpus_per_actor, options.gpus_per_actor if self.use_gpu else 0)
        self.progress = ray_session.progress_counter()
        self.model = ray.put(
            self.plan.loaded
        )  # the checked model, read by the actors from the object store of their node
        self.threads = max(1, int(options.cpus_per_actor))
        for _ in range(self.n_actors):
            self._start_actor()

    def _start_actor(self) -> None:
        actor = self.actor_class.remote(
            self.plan.config,
            self.plan.layout,
            self.model,
            "cuda" if self.use_gpu else "cpu",
            self.threads,
            self.generation,
            self.progress,
            self.options.decode_workers,
            self.n_actors,
            self.options.faults,
        )
        self.starting[actor.ready.remote()] = actor

    def _start_replacement(self) -> None:
        self.generation += 1
        self._start_actor()

    def _hand_out_shards(self) -> None:
        while self.idle and self.pending:
            actor = self.idle.pop()
            task, attempt = self.pending.popleft()
            self.running[actor.process_shard.remote(task)] = (actor, task, attempt)

    def _actor_started(self, ref: Any) -> None:
        import ray

        actor = self.starting.pop(ref)
        try:
            info = ray.get(ref)
        except ray.exceptions.RayError as error:  # e.g. its node was lost while it loaded the model
            self.on_actor_start_failed(error)
            return
        self.on_actor_ready(actor, info)

    def _shard_returned(self, ref: Any) -> None:
        import ray

        actor, task, attempt = self.running.pop(ref)
        try:
            ray.get(ref)
            self.on_shard_done(actor)
        except ray.exceptions.RayActorError as error:
            self.on_actor_died(task, attempt, error)
        except ray.exceptions.RayError as error:
            self.on_shard_failed(actor, task, attempt, error)
        self.last_progress = time.time()

    # -- handlers ----------------------------------------------------------------------------------

    def on_actor_ready(self, actor: Any, info: ActorInfo) -> None:
        """A new actor loaded its model: it joins the idle actors (JobError if it cannot decode as asked)."""
        self.ready_actors[actor] = ActorRecord(
            _checked_actor(info, self.plan.config, warned=any(r.info.cuda_missing for r in self.ready_actors.values()))
        )
        self.first_ready = self.first_ready or time.time()
        self.idle.append(actor)
        self.last_progress = time.time()

    def on_actor_start_failed(self, error: BaseException) -> None:
        """An actor could not start: replaced up to a budget, then the job goes on with the others (or stops)."""
        self.start_failures += 1
        reason = ray_session.failure_reason(error)
        if self.start_failures <= MAX_START_FAILURES_PER_ACTOR * self.n_actors:
            self._start_replacement()
            print(f"an actor could not start: {reason}; starting a replacement", file=sys.stderr)
        elif not (self.idle or self.running or self.starting):
            raise JobError(f"no actor could start ({self.start_failures} attempts); the last error: {reason}") from None
        else:
            print(
                f"an actor could not start: {reason}; going on with {len(self.idle) + len(self.running) + len(self.starting)} other actor(s)",
                file=sys.stderr,
            )

    def on_shard_done(self, actor: Any) -> None:
        self.shards_done += 1
        self.ready_actors[actor].shards += 1
        self.idle.append(actor)

    def on_actor_died(self, task: ShardTask, attempt: int, error: BaseException) -> None:
        """The actor is gone (its process or node died): a replacement starts, the shard is retried."""
        self._start_replacement()
        self._retry_or_fail(task, attempt, f"actor died: {ray_session.failure_reason(error)}")

    def on_shard_failed(self, actor: Any, task: ShardTask, attempt: int, error: BaseException) -> None:
        """The shard raised in a live actor: the actor takes other work, the shard is retried."""
        self.idle.append(actor)
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
            f"actors: {len(self.idle)} at the end; {explained} images in {seconds:.1f} s since the first actor was ready ({explained / max(seconds, 1e-9):.1f} images/s)",
            file=sys.stderr,
        )
        for number, (actor, peak) in enumerate(
            zip(self.idle, ray.get([actor.peak_rss_mib.remote() for actor in self.idle])), 1
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
