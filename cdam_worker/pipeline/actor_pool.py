"""The job's actors, started while the driver still plans the run.

Ray is joined (or started) on a thread of its own from the moment the command begins
(:class:`cdam_worker.ray_connect.Connection`). As soon as the driver knows how many shards there
are, :func:`start_actor_pool` sizes the pool to the cluster and asks Ray for the actors, again in the
background: each actor imports torch and starts its decode pool while the driver loads and checks the model.
The scheduler then gives every actor the job (:meth:`ShardProcessor.configure
<cdam_worker.pipeline.actor.ShardProcessor.configure>`) and hands out shards.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cdam_worker.pipeline import ray_session
from cdam_worker.pipeline.actor import make_actor_class

if TYPE_CHECKING:
    from cdam_worker.pipeline.plan import ExplainOptions


class JobError(RuntimeError):
    """The job could not go on (no actor could start, or another job took the output's lock over)."""


@dataclass
class ActorPool:
    """The actors asked for, and what a replacement needs to be started like them."""

    options: ExplainOptions
    actor_class: Any
    size: int  # actors asked for (what sizes each actor's default decode pool)
    use_gpu: bool
    progress: Any  # the samples-done counter the actors feed (ray_session.progress_counter)
    asked_at: float  # time.time() when the actors were asked for
    actors: list[Any] = field(default_factory=list)  # handles, in the order they were asked for; none configured yet

    def new_actor(self, generation: int) -> Any:
        """Ask Ray for one more actor like the others (``generation`` > 0: a replacement)."""
        options = self.options
        return self.actor_class.remote(
            "cuda" if self.use_gpu else "cpu",
            max(1, int(options.cpus_per_actor)),
            generation,
            self.progress,
            options.decode_workers,
            self.size,
            options.faults,
        )


def start_actor_pool(options: ExplainOptions, n_shards: int) -> Future[ActorPool]:
    """Ask for the job's actors on a thread of its own (Ray's start is waited for there); the future raises
    JobError when the cluster cannot run the job as asked (``--decode gpu`` without a GPU), or what Ray raised."""
    future: Future[ActorPool] = Future()

    def run() -> None:
        try:
            future.set_result(_start(options, n_shards))
        except BaseException as error:  # noqa: BLE001 - raised where the pool is used
            future.set_exception(error)

    threading.Thread(target=run, name="actor-pool-start", daemon=True).start()
    return future


def _start(options: ExplainOptions, n_shards: int) -> ActorPool:
    import ray

    ray_session.connect(options.address)  # waits for the connection started when the command began, if any
    resources = ray.cluster_resources()
    gpus = float(resources.get("GPU", 0))
    use_gpu = gpus > 0 and options.gpus_per_actor > 0
    if options.decode == "gpu" and not use_gpu:
        raise JobError(
            "--decode gpu needs actors with a GPU, but the Ray cluster has no GPU (or --gpus-per-actor is 0); use --decode cpu"
        )
    n_actors = options.actors or (
        max(1, int(gpus // options.gpus_per_actor))
        if use_gpu
        else max(1, int(resources.get("CPU", 1) // options.cpus_per_actor))
    )
    pool = ActorPool(
        options,
        make_actor_class(options.cpus_per_actor, options.gpus_per_actor if use_gpu else 0),
        max(1, min(n_actors, n_shards)),
        use_gpu,
        ray_session.progress_counter(),
        time.time(),
    )
    pool.actors = [pool.new_actor(0) for _ in range(pool.size)]
    return pool
