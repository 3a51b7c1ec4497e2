"""Shard samples into model inputs, decoded in a pool of worker processes beside the actor's compute.

One reader thread per shard streams the tar's raw member groups (compressed bytes, cheap to hand over)
to a :class:`DecodePool`. Its workers decode each group with the job's own rules (``cdam_worker.shards.samples``), apply the
job's checks and the model's eval transform, and send the image tensors back through shared memory
(``torch.multiprocessing``: one shared block per chunk of samples, never a pickle of pixels). Results come
back in shard order, whatever worker finished first, so rows, errors and outputs do not depend on how
many workers decode.

With one worker the pool is a thread of the actor (Pillow and the transform release the GIL), which
costs no process start. With ``gpu_jpegs`` the workers only check JPEGs that nvJPEG can take and hand
their bytes back; :class:`GpuJpegDecoder` decodes and transforms them on the actor's GPU, and everything
else (other formats, EXIF-rotated or CMYK JPEGs, images nvJPEG refuses) takes the CPU path per image.
"""

from __future__ import annotations

import ctypes
import functools
import io
import math
import multiprocessing
import os
import pickle
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from cdam_worker.pipeline.settings import ShardTask
from cdam_worker.shards.samples import MAX_IMAGE_PIXELS, ImageError, KeyGroup, SampleError, decode_group, decode_image
from cdam_worker.shards.tar_reader import ShardProblem, is_compressed, open_shard, read_groups

DECODE_CHUNK = 8
"""Samples per pool task, at most: one task, one shared-memory block back (amortises the hand-over)..."""
DECODE_CHUNK_BYTES = 1 << 20
"""...and at most about this much compressed data, so large photos spread evenly over the workers."""
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


@dataclass(frozen=True)
class SampleRules:
    """What makes a sample explainable, besides being decodable: fixed for a job."""

    require_label: bool  # a missing cls label is the sample's error (label targets)
    label_classes: int | None  # cls labels must lie in 0..label_classes-1 (label targets); None: any label


@dataclass
class PreparedSample:
    """A sample ready for the engine: its transformed image (or, for the GPU path, its JPEG) and metadata."""

    index: int  # position of its key group in the shard: its row within the shard's block
    key: str
    label: int | None
    width: int
    height: int
    sample_json: str | None  # the json member as stored (shards/samples.py)
    tensor: torch.Tensor | None = None  # (3, H, W) after the eval transform; None when ``jpeg`` is set
    jpeg: bytes | None = None  # GPU path: the JPEG to decode on the GPU
    image_name: str = ""  # member name of the image (GPU path: named in a fallback's error)


@dataclass
class _Job:
    """One key group to decode, with what the reader already knows about it."""

    index: int
    group: KeyGroup
    first_index: int  # where this key was first seen in the shard (a later group is a duplicate)
    refusal: str | None  # the job refuses this sample whatever it holds (cross-shard duplicate, shard grew)


@dataclass(frozen=True)
class _Submitted:
    """A pool task's future, with the pool it went to (a broken pool is restarted once, by its first finder)."""

    result: Future
    pool: Future[Executor]


@dataclass(frozen=True)
class DecodeSettings:
    """How a job turns samples into model inputs (travels with every pool task: it is small)."""

    transform: Callable[[Image.Image], torch.Tensor]  # the model's eval transform
    rules: SampleRules
    gpu_jpegs: bool = False  # hand JPEGs that nvJPEG takes back undecoded, for the GPU path


class DecodePool:
    """Decodes shards' samples with ``workers`` processes (one: a thread), started once per actor.

    The processes start in the background as soon as the pool is made (an actor makes it first, so they
    start while it sets up its model) and fork from a server process that imported this module once.
    """

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"decode workers must be >= 1, got {workers}")
        self.workers = workers
        self._started: Future[Executor] = _in_background(self._start)
        self._restarting = threading.Lock()

    @contextmanager
    def samples(
        self,
        task: ShardTask,
        settings: DecodeSettings,
        in_flight: int,
        members: list[tuple[str, str, int, int]] | None = None,
    ) -> Iterator[Iterator[PreparedSample | SampleError]]:
        """Start reading and decoding the shard now; the context gives its samples in tar order, each
        prepared or its SampleError, with a shard-level problem (truncated tar, unreadable object) last
        with key None. ``members``, if given, receives (key, member name, data offset, size) of every file
        of an uncompressed shard as it is read (all of them once the samples are), so that readers can
        later fetch a sample with one ranged read.

        At most about ``in_flight`` samples are read ahead (before the first is taken, too: an actor opens
        its next shard while it still explains the current one). A worker process that dies (a crash in an
        image library) fails the shard with RuntimeError after the pool is restarted, so the driver's
        retry finds a working pool. Leaving the context stops the reader.
        """
        futures: queue.Queue = queue.Queue(maxsize=max(2 * self.workers, math.ceil(in_flight / DECODE_CHUNK)))
        stop = threading.Event()
        reader = threading.Thread(
            target=self._read, args=(task, settings, futures, stop, members), name=f"read-{task.name}", daemon=True
        )
        reader.start()
        try:
            yield self._results(task, futures)
        finally:
            stop.set()
            while reader.is_alive():  # unblock a reader waiting on a full queue
                try:
                    pending = futures.get(timeout=0.1)
                    if isinstance(pending, _Submitted):
                        pending.result.cancel()
                except queue.Empty:
                    pass

    def _results(self, task: ShardTask, futures: queue.Queue) -> Iterator[PreparedSample | SampleError]:
        """The reader's futures, in order, as samples (see :meth:`samples`)."""
        while (entry := futures.get()) is not None:
            if isinstance(entry, SampleError):
                yield entry
                continue
            try:
                results, tensors = entry.result.result()
            except BrokenProcessPool as error:
                self._restart(entry.pool)
                raise RuntimeError(
                    f"a decode worker process died while decoding shard {task.name} ({error}); the decode pool was restarted"
                ) from None
            rows = iter(tensors)
            for result in results:
                if isinstance(result, PreparedSample) and result.jpeg is None:
                    result.tensor = next(rows)
                yield result

    def wait_until_started(self) -> None:
        """Block until the worker processes are up (raises what starting them raised)."""
        self._started.result()

    def close(self) -> None:
        self._started.result().shutdown(wait=False, cancel_futures=True)

    # -- helpers -------------------------------------------------------------------------------

    def _start(self) -> Executor:
        if self.workers == 1:
            return ThreadPoolExecutor(1, thread_name_prefix="decode")
        # forkserver: workers fork from a clean server that imported torch and PIL once (not from this
        # process's threads or CUDA context).
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(_forkserver_preload())
        executor = ProcessPoolExecutor(self.workers, mp_context=context, initializer=_start_worker)
        # Python starts a process per submit until all are there. Waiting for the answers makes "started"
        # mean decoding can begin: the forkserver has imported torch and the workers are forked from it.
        for started in [executor.submit(os.getpid) for _ in range(self.workers)]:
            started.result()
        return executor

    def _restart(self, broken: Future[Executor]) -> None:
        """Replace the ``broken`` pool with a fresh one, unless another shard's stream already did."""
        with self._restarting:
            if self._started is broken:
                broken.result().shutdown(wait=False, cancel_futures=True)
                self._started = _in_background(self._start)

    def _submit(self, jobs: list[_Job], pickled_settings: bytes) -> _Submitted:
        """The pool's future for ``jobs``; a pool that cannot take work gives a failed future (never raises)."""
        pool = self._started
        try:
            return _Submitted(pool.result().submit(_decode_pickled, jobs, pickled_settings), pool)
        except Exception as error:  # noqa: BLE001 - e.g. BrokenProcessPool: the consumer sees it in order
            failed: Future = Future()
            failed.set_exception(error)
            return _Submitted(failed, pool)

    def _read(
        self,
        task: ShardTask,
        settings: DecodeSettings,
        futures: queue.Queue,
        stop: threading.Event,
        members: list | None,
    ) -> None:
        """Reader thread: the shard's key groups, in chunks, to the pool; their futures, in order, to
        ``futures``, then a shard-level SampleError if the shard broke, then None; the groups' members to
        ``members`` (for an uncompressed shard, whose offsets are the file's)."""
        # Pickled once per shard, tensors by value: a worker unpickles it once (_settings_of). Handed over as
        # an object, the transform's tensors would travel as shared-memory handles, each task then fetching
        # two file descriptors from this process.
        pickled = pickle.dumps(settings)
        first_seen: dict[str, int] = {}
        chunk: list[_Job] = []
        chunk_bytes = 0
        shard_error = None
        try:
            with open_shard(task.url) as reader:
                if members is not None and is_compressed(reader):
                    members = None
                for index, group in enumerate(read_groups(reader, "r|*", read_data=True)):
                    if stop.is_set():
                        return
                    if members is not None:
                        members.extend((group.key, member.name, member.offset, member.size) for member in group.members)
                    chunk.append(
                        _Job(index, group, first_seen.setdefault(group.key, index), _refusal(task, index, group.key))
                    )
                    chunk_bytes += sum(len(member.data or b"") for member in group.members)
                    if len(chunk) == DECODE_CHUNK or chunk_bytes >= DECODE_CHUNK_BYTES:
                        futures.put(self._submit(chunk, pickled))
                        chunk, chunk_bytes = [], 0
        except ShardProblem as problem:
            shard_error = SampleError(None, str(problem))
        except Exception as error:  # noqa: BLE001 - reported as a shard-level error, the rest is kept
            shard_error = SampleError(None, f"reading shard failed: {type(error).__name__}: {error}".splitlines()[0])
        if chunk:  # the last groups, and the one a broken tar cut off (reported as incomplete)
            futures.put(self._submit(chunk, pickled))
        if shard_error is not None:
            futures.put(shard_error)
        futures.put(None)


def _in_background(start: Callable[[], Executor]) -> Future[Executor]:
    """``start()`` run on a thread of its own: the future of its result."""
    future: Future[Executor] = Future()

    def run() -> None:
        try:
            future.set_result(start())
        except BaseException as error:  # noqa: BLE001 - raised where the pool is used
            future.set_exception(error)

    threading.Thread(target=run, name="decode-pool-start", daemon=True).start()
    return future


def _forkserver_preload() -> list[str]:
    """The modules the fork server imports once for all workers: this one (torch, PIL), and the main script where
    it is the user's (a function of it may travel in the settings, so workers need not import it again). In a Ray
    actor the main script is Ray's worker loop, which no decode worker needs: not importing it (all of Ray) starts
    the pool sooner."""
    main = getattr(sys.modules["__main__"], "__file__", None) or ""
    if main.endswith(os.path.join("ray", "_private", "workers", "default_worker.py")):
        return [__name__]
    return ["__main__", __name__]


def _refusal(task: ShardTask, index: int, key: str) -> str | None:
    if key in task.duplicates:
        return task.duplicates[key]
    if index >= task.n_samples:
        return f"sample {index} is beyond the {task.n_samples} samples planned for this shard (the shard changed since the job started)"
    return None


# -- in the workers --------------------------------------------------------------------------------


def _start_worker() -> None:
    """Initialiser of a worker process: one torch thread, freed image buffers kept for reuse, and exit
    when the actor is gone."""
    torch.set_num_threads(1)
    _keep_freed_memory()
    parent = os.getppid()  # the forkserver, which exits with the actor

    def exit_with_parent() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=exit_with_parent, name="exit-with-actor", daemon=True).start()


def _keep_freed_memory() -> None:
    """Have glibc keep freed buffers of up to 256 MiB for reuse (it returns large ones to the kernel by default).

    A worker decodes in its main thread, whose heap otherwise maps every decoded photo's buffer afresh: the
    kernel zeroes those pages on first touch, a third of the decoding time of a 2-megapixel JPEG here.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 256 << 20)
    libc.mallopt(_M_TRIM_THRESHOLD, 512 << 20)


def _decode_pickled(
    jobs: list[_Job], pickled_settings: bytes
) -> tuple[list[PreparedSample | SampleError], torch.Tensor]:
    """A pool task: :func:`decode_jobs` with the shard's settings as the reader pickled them."""
    return decode_jobs(jobs, _settings_of(pickled_settings))


@functools.lru_cache(maxsize=4)
def _settings_of(pickled: bytes) -> DecodeSettings:
    """The settings a shard's tasks carry, unpickled once per worker (they are this actor's own object)."""
    return pickle.loads(pickled)


def decode_jobs(jobs: list[_Job], settings: DecodeSettings) -> tuple[list[PreparedSample | SampleError], torch.Tensor]:
    """Prepare each job's sample; the tensors of prepared samples (in order) are stacked into one."""
    results: list[PreparedSample | SampleError] = []
    tensors: list[torch.Tensor] = []
    for job in jobs:
        result = _prepare(job, settings)
        if isinstance(result, PreparedSample) and result.tensor is not None:
            tensors.append(result.tensor)
            result.tensor = None  # travels in the stacked block
        results.append(result)
    return results, torch.stack(tensors) if tensors else torch.empty(0)


def _prepare(job: _Job, settings: DecodeSettings) -> PreparedSample | SampleError:
    """The job's checks, in order: the sample's own (shards/samples.py), the job's refusal, the label's range,
    then the transform (or, for a GPU-ready JPEG, nothing more)."""
    gpu_ready: list[tuple[str, bytes]] = []

    def decode_or_probe(data: bytes, name: str) -> Image.Image:
        if settings.gpu_jpegs and (header := gpu_jpeg_header(data)) is not None:
            gpu_ready.append((name, data))
            return header
        return decode_image(data, name)

    sample = decode_group(
        job.group,
        job.index,
        {job.group.key: job.first_index},
        settings.rules.require_label,
        image_decoder=decode_or_probe,
    )
    if isinstance(sample, SampleError):
        return sample
    if job.refusal is not None:
        return SampleError(sample.key, job.refusal)
    classes = settings.rules.label_classes
    if classes is not None and sample.label is not None and not 0 <= sample.label < classes:
        return SampleError(sample.key, f"cls label {sample.label} is out of range for a model with {classes} classes")
    prepared = PreparedSample(job.index, sample.key, sample.label, sample.width, sample.height, sample.sample_json)
    if gpu_ready:
        prepared.image_name, prepared.jpeg = gpu_ready[0]
        return prepared
    return transformed(prepared, sample.image, settings.transform)


def transformed(
    prepared: PreparedSample, image: Image.Image, transform: Callable[[Image.Image], torch.Tensor]
) -> PreparedSample | SampleError:
    """``prepared`` with the transformed ``image``, or the sample's error if the transform refuses it."""
    try:
        prepared.tensor = transform(image)
    except Exception as error:  # noqa: BLE001 - a sample the transform cannot take is that sample's error
        return SampleError(prepared.key, f"transform failed: {type(error).__name__}: {error}".splitlines()[0])
    return prepared


# -- the GPU path ----------------------------------------------------------------------------------


def gpu_jpeg_header(data: bytes) -> Image.Image | None:
    """The (not decoded) image of a JPEG that nvJPEG decodes as the CPU path would, else None.

    Taken: complete baseline or progressive JPEGs (ending with their EOI marker: a cut file goes to the CPU
    path, which reports it) in RGB or greyscale, upright (no EXIF rotation), within the pixel limit.
    """
    if not (data.startswith(b"\xff\xd8\xff") and data.endswith(b"\xff\xd9")):
        return None
    try:
        image = Image.open(io.BytesIO(data), formats=["JPEG"])
        if image.mode not in ("RGB", "L") or image.width * image.height > MAX_IMAGE_PIXELS:
            return None
        if image.getexif().get(0x0112, 1) != 1:  # orientation: the CPU path turns the photo upright
            return None
    except Exception:  # noqa: BLE001 - anything odd: the CPU path decides, with its own error text
        return None
    return image


class GpuJpegDecoder:
    """Decodes JPEGs with nvJPEG on ``device`` and runs the eval transform there, step by step.

    The steps are the CPU transform's own (torchvision Resize, CenterCrop, ToTensor, Normalize) applied
    to tensors; the resize kernel is torch's bicubic with antialiasing, which is not Pillow's, so maps
    differ slightly from the CPU path's (see BENCHMARKS.md). Transforms with other steps are refused.
    """

    def __init__(self, transform: Any, device: str) -> None:
        self.device = device
        self.steps = tensor_transform_steps(transform)

    def decode(self, jpegs: list[bytes]) -> list[torch.Tensor | None]:
        """Transformed images (3, H, W) on the device; None where nvJPEG refuses the file."""
        from torchvision.io import ImageReadMode, decode_jpeg

        encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs]
        try:
            decoded: list[torch.Tensor | None] = list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:  # one bad file fails the batched call: decode one by one to find it
            decoded = []
            for data in encoded:
                try:
                    decoded.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    decoded.append(None)
        return [None if image is None else self.apply(image) for image in decoded]

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        """The transform on a decoded uint8 (3, H, W) tensor, on whatever device it lies."""
        for step in self.steps:
            image = step(image)
        return image


def tensor_transform_steps(transform: Any) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """The steps of a timm eval transform (a torchvision Compose) as functions of uint8 image tensors.

    ValueError names the first step that has no tensor equivalent here.
    """
    import torchvision.transforms as T
    import torchvision.transforms.functional as F
    from timm.data.transforms import MaybeToTensor

    steps: list[Callable[[torch.Tensor], torch.Tensor]] = []
    for step in getattr(transform, "transforms", [transform]):
        if isinstance(step, T.Resize):
            steps.append(lambda x, s=step: F.resize(x, s.size, s.interpolation, s.max_size, antialias=True))
        elif isinstance(step, T.CenterCrop):
            steps.append(lambda x, s=step: F.center_crop(x, s.size))
        elif isinstance(step, (T.ToTensor, MaybeToTensor)):
            steps.append(lambda x: x.float().div_(255))
        elif isinstance(step, T.Normalize):
            steps.append(lambda x, s=step: F.normalize(x, s.mean, s.std))
        else:
            raise ValueError(
                f"--decode gpu cannot run the transform step {type(step).__name__} on the GPU (it runs Resize, CenterCrop, ToTensor, Normalize); use --decode cpu"
            )
    return steps


def gpu_fallback(
    prepared: PreparedSample, transform: Callable[[Image.Image], torch.Tensor]
) -> PreparedSample | SampleError:
    """The CPU path for a JPEG nvJPEG refused: decoded and transformed as any other sample."""
    try:
        image = decode_image(prepared.jpeg or b"", prepared.image_name)
    except ImageError as error:
        return SampleError(prepared.key, str(error))
    prepared.jpeg = None
    return transformed(prepared, image, transform)
