"""Planning a run: every setting of ``cdam explain`` checked, the shards' sample counts found and the output's
layout fixed, before an actor starts (so a bad configuration costs one line and no cluster time).

The driver holds O(shards) state: one count per shard, from a shard index, the manifest of the run it resumes or
Ray tasks reading the tar headers (``cluster_scan.py``). Cross-shard duplicate keys are found after the shards are
written (``duplicate_keys.py``)."""

from __future__ import annotations

import dataclasses
import os
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer

from cdam_worker import __version__
from cdam_worker.maps.concepts import ConceptError, load_concept
from cdam_worker.maps.engine import CDAMExplainer, VariantConfig
from cdam_worker.maps.model import LoadedModel, load_model
from cdam_worker.maps.targets import Concept, TargetSpec
from cdam_worker.maps.text_concepts import TextError, parse_zero_shot_targets
from cdam_worker.pipeline.cluster_scan import count_samples
from cdam_worker.pipeline.faults import NO_FAULTS, Faults
from cdam_worker.pipeline.settings import ConceptSpec, JobConfig, ShardTask
from cdam_worker.shards.samples import Sample
from cdam_worker.run_files import read_json
from cdam_worker.shards.shard_index import entries_for, index_beside, read_shard_index
from cdam_worker.shards.specs import expand_shard_specs, shard_name
from cdam_worker.shards.tar_reader import iter_samples
from cdam_worker.storage import Storage
from schemas import Layout, rows_per_shard_for
from schemas.manifest import ModelSpec, fingerprint
from schemas.paths import MANIFEST_PATH


class ConfigError(ValueError):
    """A setting of the job is wrong (reported as one line before any work starts)."""


@dataclass(frozen=True)
class ExplainOptions:
    """Everything a ``cdam explain`` run takes, typed; each field is the flag of the same name (see ``cdam explain --help``)."""

    shards: Sequence[str]  # tar shards: paths, globs, brace patterns or s3:// URLs (empty: those of shard_index)
    output: str  # a folder or s3://bucket/prefix
    model: ModelSpec
    method: str = "auto"  # auto | closed_form | autograd
    precision: str = "float32"  # float32 | bf16 | tf32
    targets: str = "topk:5"
    concepts: Sequence[str] = ()  # NAME=FILE or NAME=FOLDER, optional :cosine
    variant: str = "vanilla"  # vanilla | smooth | integrated
    samples: int = 50
    noise_level: float | None = None
    seed: int = 0
    dtype: str = "float32"  # storage type of maps: float32 | float16
    store_basis: bool = False
    overwrite: bool = False
    batch_size: int | None = None  # None: the actor's default
    decode: str = "cpu"  # cpu | gpu
    decode_workers: int = 0  # 0: sized to the node
    actors: int = 0  # 0: one per GPU, else one per cpus_per_actor CPUs
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 1.0
    address: str | None = None  # Ray cluster address (None: RAY_ADDRESS, else a local Ray)
    dry_run: bool = False
    strict: bool = False
    shard_index: str | None = None  # a wids shard list, a cdam pack index.json or img2dataset *_stats.json
    faults: Faults = field(default=NO_FAULTS)  # fault injection, for the reliability tests only
    started_at: float | None = None  # when the command's process started (time.time()): its start-up is reported


@dataclass
class Plan:
    """A checked run: its settings, layout, output storage, shards, and the model every actor gets."""

    config: JobConfig
    layout: Layout
    storage: Storage
    shards: list[ShardTask]
    settings: dict[str, Any]
    loaded: LoadedModel
    zarr_attributes: dict[str, Any]
    method_reason: str = ""  # why the maps take the closed form or autograd (printed by --dry-run)
    counts_from: str = ""  # where the shards' sample counts come from (printed by --dry-run)


@dataclass(frozen=True)
class ShardList:
    """The run's shards and their sample counts, where the counts come from (printed by --dry-run), and the
    output they were planned for (opened once: on S3, credentials are resolved once)."""

    urls: list[str]
    counts: list[int]
    source: str
    output: Storage


def plan_shards(options: ExplainOptions) -> ShardList:
    """The run's shards and their sample counts, from the first of: ``--shard-index``, a ``cdam pack`` index.json
    beside the shards, the manifest of the run being resumed, or Ray tasks reading the tars' headers (a local
    scan of a few shards); ConfigError for shards that cannot be found. Cheap unless a scan is needed, so the
    driver knows the run's size, and starts its actors, before it loads the model. The output must be writable
    (StorageError, one line, else)."""
    storage = Storage.from_url(options.output)
    storage.check_writable()
    urls, counts, source = _shard_counts(options, storage)
    if counts is None:
        counts = count_samples(urls, options.address)
    return ShardList(urls, counts, source, storage)


def make_plan(options: ExplainOptions, shards: ShardList | None = None) -> Plan:
    """Check every setting and build the run's plan (the shards of :func:`plan_shards` unless given);
    ConfigError on the first problem."""
    spec = options.model
    if options.batch_size is not None and options.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {options.batch_size}")
    if options.decode_workers < 0:
        raise ConfigError(f"--decode-workers must be >= 0 (0: sized to the node), got {options.decode_workers}")
    if (
        options.decode == "gpu"
        and not (options.address or os.environ.get("RAY_ADDRESS"))
        and not torch.cuda.is_available()
    ):
        raise ConfigError(
            "--decode gpu needs CUDA, but torch.cuda.is_available() is False on this machine; use --decode cpu"
        )
    spec, target_text = _zero_shot(spec, options.targets)
    loaded = load_model(
        spec.name,
        pretrained=spec.pretrained,
        checkpoint=spec.checkpoint,
        head_checkpoint=spec.head_checkpoint,
        **dict(spec.model_kwargs),
    )
    if loaded.num_classes == 0 and target_text.strip().lower() != "none":
        raise ConfigError(
            f"model {loaded.name!r} has no classifier head: give --head-checkpoint or a checkpoint with one, or --targets none with --concepts"
        )
    try:
        targets = TargetSpec.parse(target_text, loaded.class_names)
        variant = VariantConfig(options.variant, options.samples, options.noise_level, options.seed)
        explainer = CDAMExplainer(loaded, method=options.method, precision=options.precision)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if options.store_basis and not (
        type(loaded.model) is VisionTransformer and isinstance(loaded.model.head, (torch.nn.Linear, torch.nn.Identity))
    ):
        raise ConfigError(
            f"--store-basis needs logits linear in the embedding; {loaded.name!r} has a {type(loaded.model.head).__name__} head on a {type(loaded.model).__name__}"
        )
    concepts = tuple(_load_concept(text, explainer, loaded.transform) for text in options.concepts)
    if targets.kind == "none" and not concepts:
        raise ConfigError("--targets none needs at least one --concepts NAME=FILE")

    shards = shards or plan_shards(options)  # the output's writability checked too
    storage = shards.output
    urls, counts = shards.urls, shards.counts
    first = _first_sample(urls)
    if targets.kind == "label" and first is not None and first.label is None:
        raise ConfigError(
            f"--targets label needs a 'cls' member per sample, but sample {first.key!r} of {urls[0]} has none"
        )
    tasks = [ShardTask(index, url, shard_name(url), n) for index, (url, n) in enumerate(zip(urls, counts))]
    grid = explainer.patch_grid(*loaded.data_config["input_size"][1:])
    config = JobConfig(
        output=storage.url,
        model=spec,
        model_identity={
            "name": loaded.name,
            "kwargs": loaded.model_kwargs,
            "pretrained": spec.pretrained,
            "checkpoint_sha256": loaded.checkpoint_sha256,
            "head_checkpoint_sha256": loaded.head_checkpoint_sha256,
        },
        class_names=tuple(loaded.class_names),
        targets=str(targets),
        concepts=tuple(ConceptSpec(c.name, tuple(c.vector.tolist()), c.similarity) for c in concepts),
        variant=variant.params(),
        maps_dtype=options.dtype,
        store_basis=options.store_basis,
        batch_size=options.batch_size or 0,
        method=explainer.method,
        precision=options.precision,
        rows_per_shard=rows_per_shard_for(max([*counts, 1])),
        require_label=targets.kind == "label",
        decode=options.decode,
    )
    layout = Layout(
        n_shards=len(tasks),
        rows_per_shard=config.rows_per_shard,
        n_targets=targets.num_slots(loaded.num_classes) + len(concepts),
        n_heads=loaded.model.blocks[-1].attn.num_heads,
        grid=tuple(grid),
        embed_dim=loaded.model.num_features,
        n_classes=loaded.num_classes,
        maps_dtype=options.dtype,
        store_basis=options.store_basis,
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
        "patch_size": list(
            loaded.model.patch_embed.feat_ratio(as_scalar=False)
        ),  # pixels per token (a hybrid stem included)
        "input_size": list(loaded.data_config["input_size"]),
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in loaded.data_config.items()},
        "num_prefix_tokens": loaded.model.num_prefix_tokens,
        "targets": config.targets,
        "concepts": [{"name": c.name, "similarity": c.similarity, "vector": list(c.vector)} for c in config.concepts],
        "variant": config.variant,
        "seed": options.seed,
        "maps_dtype": options.dtype,
        "rows_per_shard": config.rows_per_shard,
        "shards": [t.name for t in tasks],
    }
    return Plan(config, layout, storage, tasks, settings, loaded, attributes, explainer.method_reason, shards.source)


def _zero_shot(spec: ModelSpec, targets: str) -> tuple[ModelSpec, str]:
    """``--targets text:FILE[:K]``: the model gets the file's zero-shot head (recorded in its kwargs) and the targets are its top K."""
    try:
        parsed = parse_zero_shot_targets(targets)
    except TextError as error:
        raise ConfigError(str(error)) from None
    if parsed is None:
        return spec, targets
    if not (spec.name or "").startswith(("hf:", "open_clip:")):
        raise ConfigError(
            f"--targets {targets}: zero-shot classes need a CLIP model with a text tower (--model hf:FOLDER of a CLIPModel, or open_clip:ARCH)"
        )
    zero_shot, class_targets = parsed
    return dataclasses.replace(spec, model_kwargs={**spec.model_kwargs, "zero_shot": zero_shot}), class_targets


def _load_concept(text: str, explainer: CDAMExplainer, transform) -> Concept:
    """``NAME=FILE`` (a saved vector) or ``NAME=FOLDER`` (example images), optional ``:cosine`` suffix."""
    try:
        return load_concept(text, explainer.model.num_features, lambda: (explainer, transform))
    except ConceptError as error:
        raise ConfigError(str(error)) from None


def _shard_counts(options: ExplainOptions, storage: Storage) -> tuple[list[str], list[int] | None, str]:
    """The run's shards and their samples, from the first of: ``--shard-index``, a ``cdam pack`` index.json beside
    the shards, the manifest of the run being resumed (same shards); None: to be read from the shards' headers."""
    urls = expand_shard_specs(options.shards) if options.shards else []
    if options.shard_index:
        entries = read_shard_index(options.shard_index)
        if urls:
            entries = entries_for(entries, urls, options.shard_index)
        return [e.url for e in entries], [e.n_samples for e in entries], f"shard index {options.shard_index}"
    if not urls:
        raise ConfigError("give the shards: --shards SPEC ... and/or --shard-index FILE")
    if (beside := index_beside(urls)) is not None:
        entries = entries_for(beside, urls, "index.json")
        return urls, [e.n_samples for e in entries], f"{posixpath.dirname(urls[0])}/index.json"
    if not options.overwrite and (planned := _resumed_counts(storage, urls)) is not None:
        return urls, planned, f"the manifest of the run in {storage.url} (resumed)"
    return urls, None, "the shards' tar headers"


def _resumed_counts(storage: Storage, urls: list[str]) -> list[int] | None:
    """The sample counts the manifest at ``storage`` planned, when it planned exactly these shards."""
    manifest = read_json(storage, MANIFEST_PATH)
    shards = (manifest or {}).get("settings", {}).get("shards")
    if not isinstance(shards, list) or [s.get("url") for s in shards] != urls:
        return None
    return [int(s["n_samples"]) for s in shards]


def _first_sample(urls: list[str]) -> Sample | None:
    """The first readable sample of the run (checks decoding and labels before the job starts, or a scan)."""
    for url in urls:
        for _, item in iter_samples(url):
            if isinstance(item, Sample):
                return item
    return None


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
        f"counts       from {plan.counts_from}",
        f"output       {plan.storage.url} (writable)",
        f"estimate     {bytes_per_image / 1024:.1f} KiB per image before compression, {bytes_per_image * n_images / 2**20:.1f} MiB in all",
    ]
    print("\n".join(lines))
