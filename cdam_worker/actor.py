"""The Ray actor: loads the model once, then streams shards through the engine into the sinks.

Decoding runs in a prefetch thread (Pillow releases the GIL) while the engine computes the previous
batch; at most a few batches are in flight, so an actor never holds a whole shard.
"""

from __future__ import annotations

import os
import queue
import resource
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from cdam_worker.data import Sample, SampleError, iter_samples
from cdam_worker.engine import CDAMExplainer, CDAMResult, VariantConfig
from cdam_worker.job import JobConfig, ShardTask
from cdam_worker.model import load_model
from cdam_worker.sinks import ExplainedRow, ShardSummary, ShardWriter, open_zarr
from cdam_worker.storage import Storage
from cdam_worker.targets import Concept, TargetSpec
from schemas import Layout

TOPK_STORED = 5
# Fault injection for the reliability tests (never set in normal runs):
FAULT_ENV = "CDAM_FAULT_EXIT_AFTER_BATCHES"  # first-generation actors exit hard after N batches
FAIL_START_ENV = "CDAM_FAULT_FAIL_START"  # actors of the first N generations fail in __init__
HOLD_ENV = "CDAM_FAULT_HOLD_WHILE_EXISTS"  # actors wait before each batch while this file exists


@dataclass
class _Prepared:
    index: int
    sample: Sample
    tensor: torch.Tensor


class ShardProcessor:
    """Explains shards for one job; run as a Ray actor (:func:`make_actor_class`), usable in-process too."""

    def __init__(self, config: JobConfig, layout: Layout, device: str | None = None, threads: int | None = None, generation: int = 0, progress: Any = None) -> None:
        if int(os.environ.get(FAIL_START_ENV) or 0) > generation:
            raise RuntimeError(f"fault injection: an actor of generation {generation} fails to start")
        if threads:
            torch.set_num_threads(threads)
        self.config, self.layout, self.progress, self.generation = config, layout, progress, generation
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        spec = config.model
        self.loaded = load_model(spec.name, pretrained=spec.pretrained, checkpoint=spec.checkpoint, head_checkpoint=spec.head_checkpoint, device=self.device, **spec.model_kwargs)
        self.explainer = CDAMExplainer(self.loaded, method=config.method, precision=config.precision)
        self.targets = TargetSpec.parse(config.targets, self.loaded.class_names)
        self.concepts = tuple(Concept(c.name, torch.tensor(c.vector), c.similarity) for c in config.concepts)
        self.variant = VariantConfig(**{"name": config.variant["variant"], **{k: v for k, v in config.variant.items() if k != "variant"}})
        self.storage = Storage.from_url(config.output)
        self.group = open_zarr(self.storage)
        self.batches_done = 0
        self.fault_after = int(os.environ[FAULT_ENV]) if os.environ.get(FAULT_ENV) else None
        self.hold_file = os.environ.get(HOLD_ENV) or None

    def ready(self) -> str:
        """Answers once the model is loaded; the driver hands out work only to ready actors."""
        return self.device

    def peak_rss_mib(self) -> float:
        """This actor process's peak resident memory so far."""
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def process_shard(self, task: ShardTask) -> ShardSummary:
        """Explain every sample of a shard, record every failure, and write the shard's outputs."""
        writer = ShardWriter(self.storage, self.group, self.layout, task.shard_index, task.name, task.url, task.n_samples, self.config.run_id)
        batch: list[_Prepared] = []
        for index, item in self._prefetched(task):
            if isinstance(item, SampleError):
                writer.add_error(item.key, item.reason)
                continue
            batch.append(item)
            if len(batch) == self.config.batch_size:
                self._explain(batch, writer)
                batch = []
        if batch:
            self._explain(batch, writer)
        return writer.finish()

    # -- helpers -------------------------------------------------------------------------------

    def _prefetched(self, task: ShardTask) -> Iterator[tuple[int | None, _Prepared | SampleError]]:
        """Decoded, transformed samples from a background thread, a couple of batches ahead."""
        items: queue.Queue = queue.Queue(maxsize=2 * self.config.batch_size)
        done = object()
        stop = threading.Event()

        def produce() -> None:
            try:
                for index, item in iter_samples(task.url, require_label=self.config.require_label):
                    if stop.is_set():
                        return
                    items.put((index, self._prepare(task, index, item)))
            except Exception as error:  # noqa: BLE001 - reported as a shard-level error, the rest is kept
                items.put((None, SampleError(None, f"reading shard failed: {type(error).__name__}: {error}".splitlines()[0])))
            finally:
                items.put(done)

        thread = threading.Thread(target=produce, name=f"prefetch-{task.name}", daemon=True)
        thread.start()
        try:
            while (entry := items.get()) is not done:
                yield entry
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    items.get(timeout=0.1)
                except queue.Empty:
                    pass

    def _prepare(self, task: ShardTask, index: int | None, item: Sample | SampleError) -> _Prepared | SampleError:
        if isinstance(item, SampleError):
            return item
        if index in task.duplicates:
            return SampleError(item.key, task.duplicates[index])
        if index >= task.n_samples:
            return SampleError(item.key, f"sample {index} is beyond the {task.n_samples} samples planned for this shard (the shard changed since the job started)")
        if item.label is not None and not 0 <= item.label < self.loaded.num_classes and self.targets.kind == "label":
            return SampleError(item.key, f"cls label {item.label} is out of range for a model with {self.loaded.num_classes} classes")
        try:
            tensor = self.loaded.transform(item.image)
        except Exception as error:  # noqa: BLE001 - a sample the transform cannot take is that sample's error
            return SampleError(item.key, f"transform failed: {type(error).__name__}: {error}".splitlines()[0])
        return _Prepared(index, item, tensor)

    def _explain(self, batch: list[_Prepared], writer: ShardWriter) -> None:
        if self.hold_file is not None:
            _wait_while_exists(self.hold_file)
        images = torch.stack([p.tensor for p in batch])
        if self.device.startswith("cuda"):  # page-locked, so the copy overlaps with queued GPU work
            images = images.pin_memory().to(self.device, non_blocking=True)
        labels = [p.sample.label for p in batch]
        result = self.explainer.explain(
            images,
            self.targets,
            concepts=self.concepts,
            labels=labels if self.targets.kind == "label" else None,
            keys=[p.sample.key for p in batch],
            variant=self.variant,
            return_basis=self.config.store_basis,
        )
        arrays = _row_arrays(result)
        tables = _row_tables(result, self.loaded.class_names)
        for i, prepared in enumerate(batch):
            sample = prepared.sample
            writer.add(
                ExplainedRow(
                    local_row=prepared.index,
                    key=sample.key,
                    label=sample.label,
                    width=sample.width,
                    height=sample.height,
                    sample_json=sample.sample_json,
                    arrays={name: values[i] for name, values in arrays.items()},
                    table={name: values[i] for name, values in tables.items()},
                )
            )
        self.batches_done += 1
        if self.progress is not None:
            self.progress.add.remote(len(batch))
        if self.fault_after is not None and self.generation == 0 and self.batches_done >= self.fault_after:
            os._exit(1)  # fault injection for the reliability tests: die like a preempted node


def _wait_while_exists(path: str) -> None:
    """Hold (fault injection): announce the wait with a ``<path>.<pid>`` file, then wait for ``path`` to go."""
    announce = f"{path}.{os.getpid()}"
    if os.path.exists(path):
        open(announce, "w").close()
    while os.path.exists(path):
        time.sleep(0.05)


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
    slot_names = names[np.where(result.target_class.cpu().numpy() >= 0, result.target_class.cpu().numpy(), len(class_names) + _concept_positions(result))]
    return {
        "pred": top.indices[:, 0].int().tolist(),
        "pred_prob": top.values[:, 0].tolist(),
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
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ALLOW_HTTP", FAULT_ENV, FAIL_START_ENV, HOLD_ENV)


def make_actor_class(num_cpus: float, num_gpus: float):
    """The Ray actor class for :class:`ShardProcessor` with these resources (no automatic restarts: the driver retries shards)."""
    import ray

    env_vars = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    options = {"runtime_env": {"env_vars": env_vars}} if env_vars else {}
    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0, max_task_retries=0, **options)(ShardProcessor)
