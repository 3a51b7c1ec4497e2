"""``cdam explain``: the flags of the Ray job, turned into :class:`~cdam_worker.pipeline.plan.ExplainOptions` for
the library's driver (:func:`cdam_worker.pipeline.driver.explain`)."""

from __future__ import annotations

import argparse
import textwrap
from typing import TYPE_CHECKING

from jobs.model_flags import add_model_flags, spec_from_flags
from jobs.command import add_command

if TYPE_CHECKING:  # importing cdam_worker loads torch: not at parser construction (cdam --help stays fast)
    from cdam_worker.pipeline.plan import ExplainOptions

EPILOG = textwrap.dedent(
    """\
    output (DEST, a folder or s3://bucket/prefix):
      cdam.zarr/   Zarr v3 arrays cdam (image, target, y, x), target_class, attention,
                   embedding, logits [, basis]; one block of rows per shard
      metadata/    Parquet, one row per explained image (query with DuckDB: 'DEST/metadata/*.parquet')
      errors/      Parquet, one row per sample that could not be explained (shard, key, reason)
      markers/     per-shard completion markers; manifest.json: settings and checksums

    planning: each shard's sample count comes from --shard-index, a cdam pack index.json beside the shards,
    the manifest of the run being resumed, or else Ray tasks that read the tars' headers. A shard whose real
    count differs from its index entry is bad input like any other: errors/ gets one shard-level row saying
    so, samples beyond the entry are in errors/, every other sample is explained, and the marker and the
    manifest record the real count (the run completes; fix the index and rerun with --overwrite to explain
    the refused samples).
    Keys already in an earlier shard are checked after the shards are written: such samples of the later
    shard go to errors/ (that shard is explained again) before the run is marked complete.

    rerunning the same command resumes: completed shards are skipped. S3 uses the standard AWS
    settings (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_REGION, profiles, roles).

    examples:
      cdam explain --shards 'val-{0000..0063}.tar' --output s3://bucket/cdam/val \\
          --model vit_small_patch16_224.augreg_in21k_ft_in1k --pretrained --targets topk:5
      cdam explain --shards data/*.tar --output out --checkpoint model.pt --targets classes:zebra,7
    """
)


HELP = "explain WebDataset shards with a Ray job"
DESCRIPTION = "Explain every image of WebDataset shards: Ray actors run batched CDAM and write Zarr + Parquet."


def add_parser(commands: argparse._SubParsersAction) -> None:
    explain = add_command(commands, "explain", HELP, DESCRIPTION, EPILOG)
    data = explain.add_argument_group("data")
    data.add_argument(
        "--shards",
        nargs="+",
        default=[],
        metavar="SPEC",
        help="tar shards: paths, globs, brace patterns (val-{0000..0063}.tar) or s3://bucket/prefix/... (default: every shard of --shard-index)",
    )
    data.add_argument(
        "--shard-index",
        metavar="FILE",
        help="the shards' sample counts, so the run is planned without reading a tar: a wids shard list "
        '({"shardlist": [{"url": ..., "nsamples": ...}]}, urls absolute or relative to FILE), a cdam pack '
        "index.json (used without this flag when it lies beside the shards) or img2dataset's per-shard "
        "stats ('out/*_stats.json'); with --shards, the index must list each shard named",
    )
    data.add_argument("--output", required=True, metavar="DEST", help="output folder or s3://bucket/prefix")
    model = add_model_flags(explain)
    model.add_argument(
        "--method",
        choices=["auto", "closed_form", "autograd"],
        default="auto",
        help="how maps are computed (default: auto, the closed form where it is exact)",
    )
    model.add_argument(
        "--precision",
        choices=["float32", "bf16", "tf32"],
        default="float32",
        help="precision of the trunk (all blocks but the last) and of Smooth/Integrated's re-runs of the last block on their noisy copies: float32 (exact, TF32 off on CUDA), bf16 autocast, or tf32 (CUDA only; no effect on CPU); vanilla maps and the clean pass that picks the targets are always float32 (default: float32)",
    )
    what = explain.add_argument_group("what to explain")
    what.add_argument(
        "--targets",
        default="topk:5",
        help="topk:K | label | classes:3,7,zebra | all | none | text:FILE[:K] (CLIP models: zero-shot classes, one a line, NAME or NAME: prompt | prompt; the top K, default 5) (default: topk:5)",
    )
    what.add_argument(
        "--concepts",
        nargs="*",
        default=[],
        metavar="NAME=SOURCE",
        help='concept targets: a saved vector FILE, a FOLDER of example images, or for CLIP models text:"a photo of ..." or prompts:FILE (one prompt a line, averaged); append :cosine for cosine similarity',
    )
    what.add_argument(
        "--variant",
        choices=["vanilla", "smooth", "integrated"],
        default="vanilla",
        help="vanilla, Smooth or Integrated CDAM (default: vanilla)",
    )
    what.add_argument(
        "--samples", type=int, default=50, metavar="M", help="samples for smooth/integrated (default: 50)"
    )
    what.add_argument(
        "--noise-level",
        type=float,
        default=None,
        help="noise as a fraction of each image's value range (default: 0.05 smooth, 0 integrated)",
    )
    what.add_argument("--seed", type=int, default=0, help="seed of the per-image noise streams (default: 0)")
    out = explain.add_argument_group("output")
    out.add_argument(
        "--dtype",
        choices=["float32", "float16"],
        default="float32",
        help="storage type of maps (default: float32, exact)",
    )
    out.add_argument(
        "--store-basis",
        action="store_true",
        help="also store the relevance basis (image, feature, y, x): maps of any class or concept later, without the model",
    )
    out.add_argument("--overwrite", action="store_true", help="replace an existing output made with other settings")
    execution = explain.add_argument_group("execution")
    execution.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="images per batch (default: 32 on the CPU; on CUDA the largest power of two from 16 to 512 that fits half the GPU's free memory, measured on a probe batch)",
    )
    execution.add_argument(
        "--decode",
        choices=["cpu", "gpu"],
        default="cpu",
        help="where images are decoded and transformed: cpu (Pillow + the model's timm eval transform; bit-reproducible) or gpu (JPEGs by nvJPEG and resized on the actor's GPU: faster, maps differ slightly, see BENCHMARKS.md; other images take the CPU path) (default: cpu)",
    )
    execution.add_argument(
        "--decode-workers",
        type=int,
        default=0,
        metavar="N",
        help="decode processes per actor (1: a thread of the actor; default 0: the node's CPUs divided among the actors it holds)",
    )
    execution.add_argument(
        "--actors", type=int, default=0, help="actors (default: one per GPU, else one per --cpus-per-actor CPUs)"
    )
    execution.add_argument(
        "--cpus-per-actor", type=float, default=1.0, help="CPUs (and torch threads) per actor (default: 1)"
    )
    execution.add_argument(
        "--gpus-per-actor", type=float, default=1.0, help="GPUs per actor where the cluster has GPUs (default: 1)"
    )
    execution.add_argument(
        "--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray on 127.0.0.1)"
    )
    execution.add_argument(
        "--dry-run",
        action="store_true",
        help="check shards, model and output, print the plan and size estimate, and exit",
    )
    execution.add_argument("--strict", action="store_true", help="exit 1 when any sample could not be explained")
    explain.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``cdam explain``; returns the process exit status. Ray starts (or is joined) in the
    background before torch is imported, so the two overlap."""
    from cdam_worker.ray_connect import Connection

    connection = Connection(args.address, background=not args.dry_run)
    from cdam_worker.pipeline.driver import explain

    return explain(explain_options(args), connection)


def explain_options(args: argparse.Namespace) -> ExplainOptions:
    """The parsed flags as the driver's options; ConfigError, one line, for bad --model-kwargs. Fault injection
    (the reliability tests) comes from the ``CDAM_FAULT_*`` environment variables."""
    from cdam_worker.pipeline.faults import Faults
    from cdam_worker.pipeline.plan import ConfigError, ExplainOptions

    try:
        model = spec_from_flags(args)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return ExplainOptions(
        shards=tuple(args.shards),
        shard_index=args.shard_index,
        output=args.output,
        model=model,
        method=args.method,
        precision=args.precision,
        targets=args.targets,
        concepts=tuple(args.concepts),
        variant=args.variant,
        samples=args.samples,
        noise_level=args.noise_level,
        seed=args.seed,
        dtype=args.dtype,
        store_basis=args.store_basis,
        overwrite=args.overwrite,
        batch_size=args.batch_size,
        decode=args.decode,
        decode_workers=args.decode_workers,
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor,
        address=args.address,
        dry_run=args.dry_run,
        strict=args.strict,
        faults=Faults.from_environment(),
        started_at=args.started_at,
    )
