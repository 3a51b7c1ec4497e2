"""The Ray driver of ``cdam explain``: plan the run, hand shards to a pool of actors, resume, summarise.

Everything that can be checked before an actor starts is checked first (model, targets, shards,
output), so a bad configuration costs one line and no cluster time.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import torch
from timm.models.vision_transformer import VisionTransformer
from tqdm import tqdm

from cdam_worker import __version__
from cdam_worker.concepts import ConceptError, load_concept
from cdam_worker.data import Sample, expand_shard_specs, iter_samples, scan_shard, shard_name
from cdam_worker.engine import CDAMExplainer, VariantConfig
from cdam_worker.job import MANIFEST_FORMAT, MANIFEST_PATH, ConceptSpec, JobConfig, LockRenewal, ModelSpec, OutputLock, ShardTask, fingerprint, read_json, settings_difference, write_json
from cdam_worker.model import LoadedModel, load_model
from cdam_worker.sinks import ShardSummary, create_zarr, marker_path, shard_file_stem
from cdam_worker.storage import Storage, StorageError, redact
from cdam_worker.targets import Concept, TargetSpec
from cdam_worker.text_concepts import TextError, parse_zero_shot_targets
from jobs.model_flags import spec_from_flags
from schemas import ERRORS_SCHEMA, Layout, rows_per_shard_for

MAX_SHARD_ATTEMPTS = 3
MAX_START_FAILURES_PER_ACTOR = 2  # failed actor starts replaced, per actor of the pool, before giving up
OUTPUT_PREFIXES = ("cdam.zarr", "metadata", "errors", "markers", MANIFEST_PATH)


class ConfigError(ValueError):
    """A bad flag, model, shard or output, found before any actor starts."""


class JobError(RuntimeError):
    """The job could not go on (no actor could start, or another job took the output's lock over)."""


@dataclass
class Plan:
    config: JobConfig
    layout: Layout
    storage: Storage
    shards: list[ShardTask]
    settings: dict[str, Any]
    loaded: LoadedModel
    zarr_attributes: dict[str, Any]
    method_reason: str = ""  # why the maps take the closed form or autograd (printed by --dry-run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``cdam explain``; returns the process exit status."""
    started = time.time()
    plan = make_plan(args)
    if args.dry_run:
        print_plan(plan)
        return 0
    lock = OutputLock(plan.storage, plan.config.run_id)
    lock.acquire()
    renewal = LockRenewal(lock)
    ray_was_connected = _ray_connected()
    try:
        todo = prepare_output(plan, overwrite=args.overwrite)
        failures = dispatch(plan, todo, args, renewal.check) if todo else {}
        summaries = collect_markers(plan)
        renewal.check()
        if not failures and len(summaries) == len(plan.shards):
            finish_manifest(plan, summaries)
    finally:
        if not ray_was_connected:  # the Ray this job started (or joined) goes now, not at the interpreter's exit
            _disconnect_ray()
        renewal.stop()
        lock.release()
    return print_summary(plan, summaries, failures, time.time() - started, skipped=len(plan.shards) - len(todo), strict=args.strict)


# -- planning ----------------------------------------------------------------------------------


def make_plan(args: argparse.Namespace) -> Plan:
    """Check every setting and build the run's plan; ConfigError on the first problem."""
    try:
        spec = spec_from_flags(args)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.decode_workers < 0:
        raise ConfigError(f"--decode-workers must be >= 0 (0: sized to the node), got {args.decode_workers}")
    if args.decode == "gpu" and not (args.address or os.environ.get("RAY_ADDRESS")) and not torch.cuda.is_available():
        raise ConfigError("--decode gpu needs CUDA, but torch.cuda.is_available() is False on this machine; use --decode cpu")
    spec, target_text = _zero_shot(spec, args.targets)
    loaded = load_model(spec.name, pretrained=spec.pretrained, checkpoint=spec.checkpoint, head_checkpoint=spec.head_checkpoint, **dict(spec.model_kwargs))
    if loaded.num_classes == 0 and target_text.strip().lower() != "none":
        raise ConfigError(f"model {loaded.name!r} has no classifier head: give --head-checkpoint or a checkpoint with one, or --targets none with --concepts")
    try:
        targets = TargetSpec.parse(target_text, loaded.class_names)
        variant = VariantConfig(args.variant, args.samples, args.noise_level, args.seed)
        explainer = CDAMExplainer(loaded, method=args.method, precision=args.precision)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if args.store_basis and not (type(loaded.model) is VisionTransformer and isinstance(loaded.model.head, (torch.nn.Linear, torch.nn.Identity))):
        raise ConfigError(f"--store-basis needs logits linear in the embedding; {loaded.name!r} has a {type(loaded.model.head).__name__} head on a {type(loaded.model).__name__}")
    concepts = tuple(_load_concept(text, explainer, loaded.transform) for text in args.concepts)
    if targets.kind == "none" and not concepts:
        raise ConfigError("--targets none needs at least one --concepts NAME=FILE")

    urls = expand_shard_specs(args.shards)
    storage = Storage.from_url(args.output)
    storage.check_writable()
    scans = _scan_all(urls)
    first = _first_sample(urls, scans)
    if targets.kind == "label" and first is not None and first.label is None:
        raise ConfigError(f"--targets label needs a 'cls' member per sample, but sample {first.key!r} of {urls[0]} has none")
    tasks = _tasks(urls, scans)
    grid = explainer.patch_grid(*loaded.data_config["input_size"][1:])
    config = JobConfig(
        output=storage.url,
        model=spec,
        model_identity={"name": loaded.name, "kwargs": loaded.model_kwargs, "pretrained": spec.pretrained, "checkpoint_sha256": loaded.checkpoint_sha256, "head_checkpoint_sha256": loaded.head_checkpoint_sha256},
        class_names=tuple(loaded.class_names),
        targets=str(targets),
        concepts=tuple(ConceptSpec(c.name, tuple(c.vector.tolist()), c.similarity) for c in concepts),
        variant=variant.params(),
        maps_dtype=args.dtype,
        store_basis=args.store_basis,
        batch_size=args.batch_size or 0,
        method=explainer.method,
        precision=args.precision,
        rows_per_shard=rows_per_shard_for(max([len(s.keys) for s in scans] + [1])),
        require_label=targets.kind == "label",
        decode=args.decode,
    )
    layout = Layout(
        n_shards=len(tasks),
        rows_per_shard=config.rows_per_shard,
        n_targets=targets.num_slots(loaded.num_classes) + len(concepts),
        n_heads=loaded.model.blocks[-1].attn.num_heads,
        grid=tuple(grid),
        embed_dim=loaded.model.num_features,
        n_classes=loaded.num_classes,
        maps_dtype=args.dtype,
        store_basis=args.store_basis,
    )
    settings = config.output_settings(tasks)
    config = dataclasses.replace(config, run_id=fingerprint(settings)[:12])
    attributes = {
        "cdam_version": __version__,
        "run_fingerprint": fingerprint(settings),
        "model": config.model_identity,
        "method": explainer.method,
        "class_names": list(loaded.class_names),
        "patch_grid": list(grid),
        "patch_size": list(loaded.model.patch_embed.feat_ratio(as_scalar=False)),  # pixels per token (a hybrid stem included)
        "input_size": list(loaded.data_config["input_size"]),
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in loaded.data_config.items()},
        "num_prefix_tokens": loaded.model.num_prefix_tokens,
        "targets": config.targets,
        "concepts": [{"name": c.name, "similarity": c.similarity, "vector": list(c.vector)} for c in config.concepts],
        "variant": config.variant,
        "seed": args.seed,
        "maps_dtype": args.dtype,
        "rows_per_shard": config.rows_per_shard,
        "shards": [t.name for t in tasks],
    }
    return Plan(config, layout, storage, tasks, settings, loaded, attributes, explainer.method_reason)


def _zero_shot(spec: ModelSpec, targets: str) -> tuple[ModelSpec, str]:
    """``--targets text:FILE[:K]``: the model gets the file's zero-shot head (recorded in its kwargs) and the targets are its top K."""
    try:
        parsed = parse_zero_shot_targets(targets)
    except TextError as error:
        raise ConfigError(str(error)) from None
    if parsed is None:
        return spec, targets
    if not (spec.name or "").startswith(("hf:", "open_clip:")):
        raise ConfigError(f"--targets {targets}: zero-shot classes need a CLIP model with a text tower (--model hf:FOLDER of a CLIPModel, or open_clip:ARCH)")
    zero_shot, class_targets = parsed
    return dataclasses.replace(spec, model_kwargs={**spec.model_kwargs, "zero_shot": zero_shot}), class_targets


def _load_concept(text: str, explainer: CDAMExplainer, transform) -> Concept:
    """``NAME=FILE`` (a saved vector) or ``NAME=FOLDER`` (example images), optional ``:cosine`` suffix."""
    try:
        return load_concept(text, explainer.model.num_features, lambda: (explainer, transform))
    except ConceptError as error:
        raise ConfigError(str(error)) from None


def _scan_all(urls: list[str]):
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(tqdm(pool.map(scan_shard, urls), total=len(urls), desc="scanning shards", unit="shard", file=sys.stderr, disable=len(urls) < 8))


def _first_sample(urls: list[str], scans) -> Sample | None:
    """The first readable sample of the run (checks decoding and labels before the job starts)."""
    for url, scan in zip(urls, scans):
        if not scan.keys:
            continue
        for _, item in iter_samples(url):
            if isinstance(item, Sample):
                return item
    return None


def _tasks(urls: list[str], scans) -> list[ShardTask]:
    """One task per shard; a key already seen in an earlier shard is refused in the later one."""
    first_seen: dict[str, str] = {}
    tasks = []
    for index, (url, scan) in enumerate(zip(urls, scans)):
        name = shard_name(url)
        duplicates = {}
        for group, key in enumerate(scan.keys):
            if key in first_seen and first_seen[key] != name:
                duplicates[group] = f"duplicate key {key!r}: already in shard {first_seen[key]}"
            first_seen.setdefault(key, name)
        tasks.append(ShardTask(index, url, name, len(scan.keys), duplicates))
    return tasks


def print_plan(plan: Plan) -> None:
    layout = plan.layout
    bytes_per_image = layout.bytes_per_image()
    n_images = sum(t.n_samples for t in plan.shards)
    lines = [
        f"model        {plan.loaded.name} ({plan.config.method}; {layout.n_heads} heads, grid {layout.grid[0]}x{layout.grid[1]}, {layout.n_classes} classes)",
        f"maps         {plan.method_reason}",
        f"targets      {plan.config.targets} + {len(plan.config.concepts)} concept(s) = {layout.n_targets} maps per image",
        f"variant      {plan.config.variant}",
        f"shards       {len(plan.shards)} ({n_images} samples, {plan.config.rows_per_shard} rows reserved per shard)",
        f"output       {plan.storage.url} (writable)",
        f"estimate     {bytes_per_image / 1024:.1f} KiB per image before compression, {bytes_per_image * n_images / 2**20:.1f} MiB in all",
    ]
    print("\n".join(lines))


# -- output set-up and resume ------------------------------------------------------------------


def prepare_output(plan: Plan, overwrite: bool) -> list[ShardTask]:
    """Create or check the output; return the shards that still need work."""
    storage = plan.storage
    manifest = read_json(storage, MANIFEST_PATH)
    if manifest is not None and overwrite:
        for prefix in OUTPUT_PREFIXES:
            for path in storage.list(prefix):
                storage.delete(path)
        manifest = None
    if manifest is None:
        if any(storage.list(prefix) for prefix in OUTPUT_PREFIXES[:-1]):
            raise ConfigError(f"output {storage.url} holds files of an unfinished or foreign run without a manifest; use --overwrite to replace them")
        create_zarr(storage, plan.layout, plan.zarr_attributes, head=_linear_head(plan.loaded.model) if plan.layout.store_basis else None)
        write_json(storage, MANIFEST_PATH, _manifest(plan, status="running"))
        return list(plan.shards)
    if manifest.get("fingerprint") != fingerprint(plan.settings):
        differs = settings_difference(manifest.get("settings", {}), plan.settings)
        raise ConfigError(f"output {storage.url} was made with different settings ({differs}); use another --output or --overwrite")
    done = {t.shard_index for t in plan.shards if storage.exists(marker_path(t.shard_index))}
    return [t for t in plan.shards if t.shard_index not in done]


def _manifest(plan: Plan, status: str, shards: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "cdam_version": __version__,
        "status": status,
        "fingerprint": fingerprint(plan.settings),
        "settings": plan.settings,
        "model_source": dataclasses.asdict(plan.config.model),  # how to load the model again (cdam evaluate, derive)
        "layout": {"rows_per_shard": plan.layout.rows_per_shard, "n_targets": plan.layout.n_targets, "grid": list(plan.layout.grid), "maps_dtype": plan.layout.maps_dtype, "store_basis": plan.layout.store_basis},
        "shards": shards if shards is not None else [{"index": t.shard_index, "name": t.name, "url": t.url, "n_samples": t.n_samples} for t in plan.shards],
    }


def _linear_head(model: torch.nn.Module) -> tuple[Any, Any] | None:
    """(weight (C, D), bias (C)) as numpy of a head that is one linear layer on the pre-logits feature, else None."""
    head = getattr(model, "head", None)
    if not isinstance(head, torch.nn.Linear):
        return None
    bias = head.bias if head.bias is not None else head.weight.new_zeros(head.out_features)
    return head.weight.detach().float().cpu().numpy(), bias.detach().float().cpu().numpy()


def collect_markers(plan: Plan) -> dict[int, ShardSummary]:
    summaries = {}
    for task in plan.shards:
        marker = read_json(plan.storage, marker_path(task.shard_index))
        if marker is not None:
            summaries[task.shard_index] = ShardSummary.from_marker(marker)
    return summaries


def finish_manifest(plan: Plan, summaries: dict[int, ShardSummary]) -> None:
    shards = [{"index": s.shard_index, "name": s.shard, "url": s.url, "n_samples": s.n_samples, "n_images": s.n_images, "n_errors": s.n_errors, "rows_checked": s.rows_checked, "checksums": s.checksums} for s in sorted(summaries.values(), key=lambda s: s.shard_index)]
    manifest = _manifest(plan, status="complete", shards=shards)
    manifest["totals"] = {"images": sum(s.n_images for s in summaries.values()), "errors": sum(s.n_errors for s in summaries.values())}
    write_json(plan.storage, MANIFEST_PATH, manifest)


# -- the actor pool ----------------------------------------------------------------------------


def dispatch(plan: Plan, tasks: list[ShardTask], args: argparse.Namespace, check_lock: Callable[[], None]) -> dict[int, str]:
    """Run ``tasks`` on a pool of actors, retrying shards whose actor died; returns failed shards.

    ``check_lock`` runs every second and raises when the output's lock is lost (the job then stops).
    """
    import ray

    from cdam_worker.actor import make_actor_class

    _init_ray(args.address)
    gpus = float(ray.cluster_resources().get("GPU", 0))
    use_gpu = gpus > 0 and args.gpus_per_actor > 0
    if plan.config.decode == "gpu" and not use_gpu:
        raise JobError("--decode gpu needs actors with a GPU, but the Ray cluster has no GPU (or --gpus-per-actor is 0); use --decode cpu")
    n_actors = args.actors or (max(1, int(gpus // args.gpus_per_actor)) if use_gpu else max(1, int(ray.cluster_resources().get("CPU", 1) // args.cpus_per_actor)))
    n_actors = min(n_actors, len(tasks))
    actor_class = make_actor_class(args.cpus_per_actor, args.gpus_per_actor if use_gpu else 0)
    progress = _progress_counter()
    model = ray.put(plan.loaded)  # the checked model, read by the actors from the object store of their node
    threads = max(1, int(args.cpus_per_actor))
    generation = 0  # bumped for every replacement actor (fault injection acts on the first generations)
    start_failures = 0

    starting: dict = {}  # ready() reference -> actor still loading its model
    actors: dict = {}  # ready actor -> _ActorRecord
    first_ready = None  # when the first actor was ready: the job's throughput is measured from there

    def start_actor() -> None:
        actor = actor_class.remote(plan.config, plan.layout, model, "cuda" if use_gpu else "cpu", threads, generation, progress, args.decode_workers, n_actors)
        starting[actor.ready.remote()] = actor

    def start_replacement() -> None:
        nonlocal generation
        generation += 1
        start_actor()

    for _ in range(n_actors):
        start_actor()
    idle: list = []
    pending = deque((task, 1) for task in tasks)
    running: dict = {}
    failures: dict[int, str] = {}
    last_progress = time.time()
    total = sum(t.n_samples for t in tasks)
    bar = tqdm(total=total, desc="explaining", unit="img", file=sys.stderr, mininterval=1.0, dynamic_ncols=True)
    shards_done = 0
    try:
        while pending or running:
            while idle and pending:
                actor = idle.pop()
                task, attempt = pending.popleft()
                running[actor.process_shard.remote(task)] = (actor, task, attempt)
            ready, _ = ray.wait(list(running) + list(starting), num_returns=1, timeout=1.0)
            check_lock()
            for ref in ready:
                if ref in starting:
                    actor = starting.pop(ref)
                    try:
                        actors[actor] = _ActorRecord(_checked_actor(ray.get(ref), plan.config, warned=any(r.info.cuda_missing for r in actors.values())))
                        first_ready = first_ready or time.time()
                        idle.append(actor)
                        last_progress = time.time()
                    except ray.exceptions.RayError as error:
                        # e.g. its node was lost while it loaded the model: replaced, up to a budget
                        start_failures += 1
                        reason = _first_line(error)
                        if start_failures <= MAX_START_FAILURES_PER_ACTOR * n_actors:
                            start_replacement()
                            print(f"an actor could not start: {reason}; starting a replacement", file=sys.stderr)
                        elif not (idle or running or starting):
                            raise JobError(f"no actor could start ({start_failures} attempts); the last error: {reason}") from None
                        else:
                            print(f"an actor could not start: {reason}; going on with {len(idle) + len(running) + len(starting)} other actor(s)", file=sys.stderr)
                    continue
                actor, task, attempt = running.pop(ref)
                try:
                    ray.get(ref)
                    shards_done += 1
                    actors[actor].shards += 1
                    idle.append(actor)
                except ray.exceptions.RayActorError as error:
                    start_replacement()
                    _retry_or_fail(task, attempt, f"actor died: {_first_line(error)}", pending, failures, plan)
                except ray.exceptions.RayError as error:
                    idle.append(actor)
                    _retry_or_fail(task, attempt, _first_line(error), pending, failures, plan)
                last_progress = time.time()
            bar.n = min(total, ray.get(progress.value.remote()))
            bar.set_postfix_str(f"shards {shards_done}/{len(tasks)}", refresh=True)
            if not running and not idle and pending and time.time() - last_progress > 600:
                raise JobError("no actor could be started for 10 minutes: the cluster lacks the resources asked for (--cpus-per-actor / --gpus-per-actor)")
    finally:
        bar.close()
    explained = ray.get(progress.value.remote())
    seconds = time.time() - (first_ready or time.time())
    print(f"actors: {len(idle)} at the end; {explained} images in {seconds:.1f} s since the first actor was ready ({explained / max(seconds, 1e-9):.1f} images/s)", file=sys.stderr)
    for number, (actor, peak) in enumerate(zip(idle, ray.get([actor.peak_rss_mib.remote() for actor in idle])), 1):
        record = actors[actor]
        info = record.info
        print(f"actor {number}: node {info.node[:12]}, {info.device}, decode {info.decode} with {info.decode_workers} worker(s), batch {info.batch_size}, {record.shards} shard(s), peak RSS {peak:.0f} MiB", file=sys.stderr)
    return failures


@dataclass
class _ActorRecord:
    info: Any  # cdam_worker.actor.ActorInfo
    shards: int = 0  # shards it completed


def _checked_actor(info: Any, config: JobConfig, warned: bool) -> Any:
    """An actor's ActorInfo, once it is ready; JobError when it cannot decode as asked. Says once (unless
    ``warned``: an earlier actor said it) that actors given a GPU found no usable CUDA and run on the CPU."""
    if config.decode == "gpu" and info.decode != "gpu":
        raise JobError(f"--decode gpu needs CUDA, but an actor on node {info.node[:12]} has none (torch.cuda.is_available() is False there); use --decode cpu")
    if info.cuda_missing and not warned:
        print("warning: actors hold a GPU of the Ray cluster but CUDA is not usable on their node (torch.cuda.is_available() is False); they compute on the CPU", file=sys.stderr)
    return info


def _retry_or_fail(task: ShardTask, attempt: int, reason: str, pending: deque, failures: dict[int, str], plan: Plan) -> None:
    if attempt < MAX_SHARD_ATTEMPTS:
        print(f"shard {task.name}: {reason}; retrying (attempt {attempt + 1} of {MAX_SHARD_ATTEMPTS})", file=sys.stderr)
        pending.append((task, attempt + 1))
        return
    failures[task.shard_index] = reason
    try:
        _write_shard_failure(plan, task, reason)
    except StorageError as error:  # the summary still reports the shard; the job goes on with the others
        print(f"warning: could not record the failure of shard {task.name} in errors/: {error}", file=sys.stderr)


def _write_shard_failure(plan: Plan, task: ShardTask, reason: str) -> None:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{"shard": task.name, "shard_index": task.shard_index, "key": None, "reason": f"shard failed after {MAX_SHARD_ATTEMPTS} attempts: {reason}", "run_id": plan.config.run_id}], schema=ERRORS_SCHEMA)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    plan.storage.put(f"errors/{shard_file_stem(task.shard_index, task.name)}.parquet", sink.getvalue())


def _ray_connected() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _disconnect_ray() -> None:
    """Shut down the local Ray this process started (or leave the cluster it joined), if connected."""
    if _ray_connected():
        sys.modules["ray"].shutdown()


def _init_ray(address: str | None) -> None:
    import ray

    if _ray_connected():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    sigterm_handler = signal.getsignal(signal.SIGTERM)
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=True)
    if sigterm_handler is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, sigterm_handler)  # ray.init's own handler exits silently with status 15


def _progress_counter():
    """A counter of explained images for the progress bar, on the driver's node: losing another node
    must not lose it (the driver would fail reading it)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False))
    class ProgressCounter:
        def __init__(self) -> None:
            self.images = 0

        def add(self, n: int) -> None:
            self.images += n

        def value(self) -> int:
            return self.images

    return ProgressCounter.remote()


def _first_line(error: BaseException) -> str:
    """One line saying why a Ray call failed: the first line of what the actor raised, else Ray's last line."""
    import ray

    cause = getattr(error, "cause", None)
    if isinstance(error, ray.exceptions.RayTaskError) and isinstance(cause, Exception):
        lines = str(cause).strip().splitlines()
        return redact(f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__)[:500]
    text = str(error).strip()
    return text.splitlines()[-1] if text else type(error).__name__


# -- summary -----------------------------------------------------------------------------------


def print_summary(plan: Plan, summaries: dict[int, ShardSummary], failures: dict[int, str], seconds: float, skipped: int, strict: bool) -> int:
    images = sum(s.n_images for s in summaries.values())
    errors = sum(s.n_errors for s in summaries.values())
    lines = [
        f"done: {images} images explained, {errors} samples in errors/, {len(summaries)}/{len(plan.shards)} shards complete ({skipped} already done before this run)",
        f"time: {seconds:.1f} s ({images / max(seconds, 1e-9):.1f} images/s overall)",
        f"output: {plan.storage.url} ({plan.storage.total_size() / 2**20:.1f} MiB)",
    ]
    for index, reason in sorted(failures.items()):
        lines.append(f"FAILED shard {plan.shards[index].name}: {reason}")
    unaccounted = [f"UNACCOUNTED shard {s.shard}: {problem}" for s in sorted(summaries.values(), key=lambda s: s.shard_index) if (problem := s.unaccounted())]
    print("\n".join(lines + unaccounted))
    if failures or len(summaries) != len(plan.shards):
        print(f"error: {len(plan.shards) - len(summaries)} shard(s) not complete; rerun the same command to finish them", file=sys.stderr)
        return 1
    if unaccounted:
        print(f"error: {len(unaccounted)} shard(s) do not have each sample either explained or in errors/ exactly once (see UNACCOUNTED above)", file=sys.stderr)
        return 1
    if strict and errors:
        print(f"error: {errors} sample(s) could not be explained (--strict); see {plan.storage.url}/errors/", file=sys.stderr)
        return 1
    return 0
