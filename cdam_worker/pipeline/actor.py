"""The Ray actor: loads the model once, then streams shards through the engine into the sinks.

Three stages overlap, so the engine (the compute thread) waits neither on decoding nor on storage:
a :class:`~cdam_worker.pipeline.decode_pool.DecodePool` reads and decodes a couple of batches ahead, the engine
explains a batch, and a writer thread turns the previous batch's results into Zarr chunks and Parquet
rows. At most a few batches are in flight, so an actor never holds a whole shard. On CUDA the batch
goes to the GPU from page-locked memory on a copy stream of its own, and the default batch size is
the one that fills the GPU.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import resource
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cdam_worker.maps.engine import CDAMExplainer, CDAMResult, VariantConfig
from cdam_worker.maps.model import LoadedModel
from cdam_worker.maps.targets import Concept, TargetSpec
from cdam_worker.pipeline.decode_pool import (
    DecodePool,
    DecodeSettings,
    GpuJpegDecoder,
    PreparedSample,
    SampleRules,
    gpu_fallback,
)
from cdam_worker.pipeline.faults import NO_FAULTS, Faults
from cdam_worker.pipeline.settings import JobConfig, ShardTask
from cdam_worker.pipeline.sinks import ExplainedRow, ShardWriter
from cdam_worker.run_files import open_zarr
from cdam_worker.shards.samples import SampleError
from cdam_worker.storage import Storage
from schemas import Layout
from schemas.manifest import ShardSummary

TOPK_STORED = 5
SHARDS_AT_ONCE = 2  # shards a Ray actor holds: the one it explains and the next, read and decoded meanwhile
CPU_BATCH_SIZE = 32  # the default batch on the CPU
GPU_BATCH_RANGE = (16, 512)  # the default batch on CUDA: the largest power of two in this range that fits
GPU_MEMORY_SHARE = 0.5  # share of the free GPU memory the default batch may fill
WRITE_QUEUE_BATCHES = 2  # explained batches waiting for the writer thread


@dataclass(frozen=True)
class ActorInfo:
    """What a started actor reports to the driver."""

    device: str  # where it computes
    cuda_missing: bool  # it was given a GPU but CUDA is not usable on its node, so it computes on the CPU
    decode: str  # "cpu" or "gpu" (nvJPEG)
    decode_workers: int
    batch_size: int
    node: str  # Ray node id ("" outside Ray)


class ShardProcessor:
    """Explains shards for one job; run as a Ray actor (:func:`make_actor_class`), usable in-process too.

    It starts in two steps, so that the driver can start its actors while it still plans the run: making
    it imports torch and starts the decode pool; :meth:`configure` then gives it the job (settings, layout,
    and the model the driver loaded and checked, shipped once per node through Ray's object store, so no
    actor creates a model or reads a checkpoint). ``decode_workers`` 0 sizes the decode pool to the node:
    its CPUs divided among the ``job_actors`` actors it can hold (:func:`default_decode_workers`).

    As a Ray actor it takes two shards at once (:data:`SHARDS_AT_ONCE`): the second one's samples are read
    and decoded while the first one's last batches are explained and written, and its compute starts when
    the first one's ends, so there is no drain at shard boundaries. Each shard keeps its own writer.
    """

    def __init__(
        self,
        device: str | None = None,
        threads: int | None = None,
        generation: int = 0,
        progress: Any = None,
        decode_workers: int = 0,
        job_actors: int = 1,
        faults: Faults = NO_FAULTS,
    ) -> None:
        faults.at_start(generation)
        if threads:
            torch.set_num_threads(threads)
        self.decode_workers = decode_workers
        self.decoder = DecodePool(decode_workers or default_decode_workers(job_actors))  # starts in the background
        self.progress, self.generation, self.faults = progress, generation, faults
        wanted = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.cuda_missing = (
            wanted.startswith("cuda") and not torch.cuda.is_available()
        )  # e.g. a GPU resource without a driver
        self.device = "cpu" if self.cuda_missing else wanted
        self.compute_turn = threading.Lock()  # one shard explains at a time; the next one reads and decodes meanwhile
        self.batches_done = 0

    def configure(self, config: JobConfig, layout: Layout, loaded: LoadedModel, job_actors: int = 0) -> ActorInfo:
        """Take the job: the model on this actor's device, the targets, the output. Answers once the decode
        pool is up too; the driver hands out shards only to configured actors. ``job_actors`` (when given)
        is the number of actors the job kept: a default-sized decode pool is resized to it."""
        if job_actors and not self.decode_workers and default_decode_workers(job_actors) != self.decoder.workers:
            self.decoder.close()
            self.decoder = DecodePool(default_decode_workers(job_actors))
        self.config, self.layout = config, layout
        self.loaded = dataclasses.replace(loaded, model=loaded.model.to(self.device))
        self.explainer = CDAMExplainer(self.loaded, method=config.method, precision=config.precision)
        self.targets = TargetSpec.parse(config.targets, self.loaded.class_names)
        self.concepts = tuple(Concept(c.name, torch.tensor(c.vector), c.similarity) for c in config.concepts)
        self.variant = VariantConfig(
            **{"name": config.variant["variant"], **{k: v for k, v in config.variant.items() if k != "variant"}}
        )
        self.storage = Storage.from_url(config.output)
        self.group = open_zarr(self.storage)
        on_cuda = self.device.startswith("cuda")
        self.gpu_decoder = (
            GpuJpegDecoder(self.loaded.transform, self.device) if config.decode == "gpu" and on_cuda else None
        )
        self.copy_stream = torch.cuda.Stream(self.device) if on_cuda else None
        self.batch_size = config.batch_size or (self._batch_size_filling_gpu() if on_cuda else CPU_BATCH_SIZE)
        rules = SampleRules(config.require_label, self.loaded.num_classes if self.targets.kind == "label" else None)
        self.decode_settings = DecodeSettings(self.loaded.transform, rules, gpu_jpegs=self.gpu_decoder is not None)
        self.decoder.wait_until_started()
        return ActorInfo(
            self.device,
            self.cuda_missing,
            "gpu" if self.gpu_decoder else "cpu",
            self.decoder.workers,
            self.batch_size,
            _ray_node_id(),
        )

    def peak_rss_mib(self) -> float:
        """This actor process's peak resident memory so far."""
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def process_shard(self, task: ShardTask) -> ShardSummary:
        """Explain every sample of a shard, record every failure, and write the shard's outputs."""
        output = _WriterThread(
            ShardWriter(
                self.storage,
                self.group,
                self.layout,
                task.shard_index,
                task.name,
                task.url,
                task.n_samples,
                self.config.run_id,
            )
        )
        batch: list[PreparedSample] = []
        members: list[tuple[str, str, int, int]] = []
        samples_read = 0
        try:
            # Reading and decoding start now; explaining waits for the shard before this one (if any) to finish its own.
            with self.decoder.samples(task, self.decode_settings, 2 * self.batch_size, members) as samples:
                with self.compute_turn:
                    for item in samples:
                        samples_read += item.key is not None  # a SampleError without a key is about the shard
                        if isinstance(item, SampleError):
                            self._record_error(output, item)
                            continue
                        batch.append(item)
                        if len(batch) == self.batch_size:
                            self._explain(batch, output)
                            batch = []
                    if batch:
                        self._explain(batch, output)
            output.submit(lambda writer: writer.add_members(members))
            output.submit(lambda writer: writer.record_samples_read(samples_read))
        except BaseException:
            output.abandon()
            raise
        return output.finish()

    # -- helpers -------------------------------------------------------------------------------

    def _explain(self, batch: list[PreparedSample], output: _WriterThread) -> None:
        self.faults.before_batch()
        if self.gpu_decoder is not None:
            batch = self._decode_jpegs_on_gpu(batch, output)
            if not batch:
                return
        images = self._to_device([p.tensor for p in batch])
        result = self._run(images, [p.label for p in batch], [p.key for p in batch])
        output.submit(lambda writer: self._write(writer, batch, result))

    def _run(
        self, images: torch.Tensor, labels: list[int | None], keys: list[str], variant: VariantConfig | None = None
    ) -> CDAMResult:
        return self.explainer.explain(
            images,
            self.targets,
            concepts=self.concepts,
            labels=labels if self.targets.kind == "label" else None,
            keys=keys,
            variant=variant or self.variant,
            return_basis=self.config.store_basis,
        )

    def _to_device(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The batch on the compute device; on CUDA copied from page-locked memory on the copy stream, so
        the copy overlaps the kernels still queued for the previous batch."""
        if self.copy_stream is None:
            return torch.stack(tensors)
        if self.gpu_decoder is not None:  # decoded on the GPU, but for the few the CPU path took
            return torch.stack([t.to(self.device) for t in tensors])
        host = torch.stack(tensors).pin_memory()
        with torch.cuda.stream(self.copy_stream):
            images = host.to(self.device, non_blocking=True)
        compute = torch.cuda.current_stream(self.device)
        compute.wait_stream(self.copy_stream)
        images.record_stream(compute)
        return images

    def _decode_jpegs_on_gpu(self, batch: list[PreparedSample], output: _WriterThread) -> list[PreparedSample]:
        """JPEGs decoded and transformed on the GPU; those nvJPEG refuses take the CPU path (or become errors)."""
        jpegs = [p for p in batch if p.jpeg is not None]
        decoded = self.gpu_decoder.decode([p.jpeg for p in jpegs]) if jpegs else []
        for prepared, image in zip(jpegs, decoded):
            if image is not None:
                prepared.tensor, prepared.jpeg = image, None
        kept = []
        for prepared in batch:
            item = gpu_fallback(prepared, self.loaded.transform) if prepared.jpeg is not None else prepared
            if isinstance(item, SampleError):
                self._record_error(output, item)
            else:
                kept.append(item)
        return kept

    def _record_error(self, output: _WriterThread, error: SampleError) -> None:
        """A sample that cannot be explained: a row of the shard's errors table, and done as far as progress goes."""
        output.submit(lambda writer: writer.add_error(error.key, error.reason))
        if self.progress is not None:
            self.progress.add.remote(0, 1)

    def _write(self, writer: ShardWriter, batch: list[PreparedSample], result: CDAMResult) -> None:
        """Writer thread: one explained batch into the shard's rows (then progress, and fault injection)."""
        arrays = _row_arrays(result)
        tables = _row_tables(result, self.loaded.class_names)
        for i, prepared in enumerate(batch):
            writer.add(
                ExplainedRow(
                    local_row=prepared.index,
                    key=prepared.key,
                    label=prepared.label,
                    width=prepared.width,
                    height=prepared.height,
                    sample_json=prepared.sample_json,
                    arrays={name: values[i] for name, values in arrays.items()},
                    table={name: values[i] for name, values in tables.items()},
                )
            )
        self.batches_done += 1
        if self.progress is not None:
            self.progress.add.remote(len(batch))
        self.faults.after_batch(self.generation, self.batches_done)

    def _batch_size_filling_gpu(self) -> int:
        """The default batch on CUDA, from the memory a probe batch of vanilla maps takes (Smooth and
        Integrated CDAM size their own passes over the copies to the free memory)."""
        probe = GPU_BATCH_RANGE[0]
        images = torch.randn(probe, *self.loaded.data_config["input_size"], device=self.device)
        torch.cuda.synchronize(self.device)
        baseline = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._run(images, [0] * probe, [f"probe-{i}" for i in range(probe)], variant=VariantConfig("vanilla"))
        torch.cuda.synchronize(self.device)
        per_image = (torch.cuda.max_memory_allocated(self.device) - baseline) / probe
        free, _ = torch.cuda.mem_get_info(self.device)
        return batch_size_for_memory(per_image, free)


def batch_size_for_memory(bytes_per_image: float, free_bytes: int) -> int:
    """The largest power of two within GPU_BATCH_RANGE whose batch needs at most GPU_MEMORY_SHARE of ``free_bytes``."""
    low, high = GPU_BATCH_RANGE
    fits = int(GPU_MEMORY_SHARE * free_bytes // max(bytes_per_image, 1.0))
    return max(low, min(high, 1 << max(fits, 1).bit_length() - 1))


def default_decode_workers(job_actors: int) -> int:
    """Decode workers for an actor: its node's CPUs divided among the job's actors that fit on the node.

    Inside Ray the node's CPUs and GPUs are Ray's count of them, and an actor fits as often as the node
    holds the resources this one was given (at most ``job_actors``); outside Ray, all of this machine's CPUs.
    """
    ray = _running_ray()
    if ray is None:
        return len(os.sched_getaffinity(0))
    node_id = ray.get_runtime_context().get_node_id()
    node = next(n["Resources"] for n in ray.nodes() if n["NodeID"] == node_id)
    given = {
        name: amount
        for name, amount in ray.get_runtime_context().get_assigned_resources().items()
        if name in ("CPU", "GPU") and amount > 0
    }
    fits = min((int(node.get(name, 0) // amount) for name, amount in given.items()), default=job_actors)
    return max(1, int(node.get("CPU", 1) // max(1, min(job_actors, fits))))


def _ray_node_id() -> str:
    ray = _running_ray()
    return ray.get_runtime_context().get_node_id() if ray is not None else ""


def _running_ray() -> Any:
    """The ray module when this process is connected to Ray (as an actor is), else None (Ray need not be installed)."""
    ray = sys.modules.get("ray")
    return ray if ray is not None and ray.is_initialized() else None


class _WriterThread:
    """Runs a shard's ShardWriter calls in order on a thread of its own, so storage never holds up the engine.

    ``submit`` re-raises (on the compute thread) a failure of an earlier call; ``finish`` writes the
    tables and the marker and returns the summary once every call is done.
    """

    def __init__(self, writer: ShardWriter) -> None:
        self.writer = writer
        self._calls: queue.Queue = queue.Queue(maxsize=WRITE_QUEUE_BATCHES)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"write-{writer.shard}", daemon=True)
        self._thread.start()

    def submit(self, call: Callable[[ShardWriter], None]) -> None:
        if self._error is not None:
            raise self._error
        self._calls.put(call)

    def finish(self) -> ShardSummary:
        self._calls.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self.writer.finish()

    def abandon(self) -> None:
        """Stop after the calls already queued (the shard failed; a retry rewrites its whole block)."""
        self._calls.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (call := self._calls.get()) is not None:
            if self._error is None:
                try:
                    call(self.writer)
                except BaseException as error:  # noqa: BLE001 - handed to the compute thread
                    self._error = error


def _row_arrays(result: CDAMResult) -> dict[str, np.ndarray]:
    arrays = {
        "cdam": result.cdam,
        "target_class": result.target_class.int(),
        "attention": result.attention,
        "embedding": result.embedding,
        "logits": result.logits,
    }
    if result.basis is not None:
        arrays["basis"] = result.basis
    return {name: value.detach().cpu().numpy() for name, value in arrays.items()}


def _row_tables(result: CDAMResult, class_names: list[str]) -> dict[str, list]:
    """Per-image metadata columns, computed for the whole batch at once."""
    probs = result.logits.float().softmax(dim=1)
    top = probs.topk(min(TOPK_STORED, probs.shape[1]), dim=1)
    flat = result.cdam.flatten(2).float()
    names = np.array(list(class_names) + list(result.concept_names), dtype=object)
    slot_names = names[
        np.where(
            result.target_class.cpu().numpy() >= 0,
            result.target_class.cpu().numpy(),
            len(class_names) + _concept_positions(result),
        )
    ]
    headless = (
        [-1] * probs.shape[0] if probs.shape[1] == 0 else None
    )  # a feature extractor (concepts only) predicts no class
    return {
        "pred": headless or top.indices[:, 0].int().tolist(),
        "pred_prob": [0.0] * len(headless) if headless else top.values[:, 0].tolist(),
        "topk_classes": top.indices.int().tolist(),
        "topk_probs": top.values.tolist(),
        "targets": result.target_class.int().tolist(),
        "target_names": slot_names.tolist(),
        "relevance_pos_sum": flat.clamp_min(0).sum(2).tolist(),
        "relevance_neg_sum": flat.clamp_max(0).sum(2).tolist(),
        "relevance_argmax": flat.argmax(2).int().tolist(),
    }


def _concept_positions(result: CDAMResult) -> np.ndarray:
    """For each slot, its position among the concept slots (meaningful only where target_class is -1)."""
    is_concept = (result.target_class.cpu().numpy() < 0).astype(np.int64)
    return np.cumsum(is_concept, axis=1) - 1


# Settings that reach the actors from the driver's environment. Never credentials: actors get those
# from their own node (environment, profile or instance role), so no secret travels through Ray.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ALLOW_HTTP")


def make_actor_class(num_cpus: float, num_gpus: float):
    """The Ray actor class for :class:`ShardProcessor` with these resources (no automatic restarts: the driver retries shards)."""
    import ray

    env_vars = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    options = {"runtime_env": {"env_vars": env_vars}} if env_vars else {}
    return ray.remote(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        max_restarts=0,
        max_task_retries=0,
        max_concurrency=SHARDS_AT_ONCE,
        **options,
    )(ShardProcessor)
