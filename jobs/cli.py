"""The ``cdam`` command: ``explain`` a dataset, run the offline ``demo``, ``verify`` an output, and the
commands that read a finished run (one thin module each in ``jobs/``, listed in ``READING_COMMANDS``).

A reading command's module defines ``add_parser(commands)``, which adds its subparser and sets
``handler`` to a function ``(args) -> exit status``; it imports its library code inside that function,
so ``cdam --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
import textwrap
import threading
from typing import Iterator

from jobs.model_flags import add_model_flags

EXPLAIN_EPILOG = textwrap.dedent(
    """\
    output (DEST, a folder or s3://bucket/prefix):
      cdam.zarr/   Zarr v3 arrays cdam (image, target, y, x), target_class, attention,
                   embedding, logits [, basis]; one block of rows per shard
      metadata/    Parquet, one row per explained image (query with DuckDB: 'DEST/metadata/*.parquet')
      errors/      Parquet, one row per sample that could not be explained (shard, key, reason)
      markers/     per-shard completion markers; manifest.json: settings and checksums

    rerunning the same command resumes: completed shards are skipped. S3 uses the standard AWS
    settings (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_REGION, profiles, roles).

    examples:
      cdam explain --shards 'val-{0000..0063}.tar' --output s3://bucket/cdam/val \\
          --model vit_small_patch16_224.augreg_in21k_ft_in1k --pretrained --targets topk:5
      cdam explain --shards data/*.tar --output out --checkpoint model.pt --targets classes:zebra,7
    """
)


READING_COMMANDS = ("query", "audit", "serve", "report", "show", "export_fiftyone", "derive", "evaluate")
"""Modules of ``jobs/`` whose commands read a finished run through ``cdam_worker.reading.open_run``."""
TOOL_COMMANDS = ("pack",)
"""Modules of ``jobs/`` with other commands (same ``add_parser`` protocol) that do not read a run."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdam", description="Class-Discriminative Attention Maps (CDAM) for whole image datasets with timm ViTs.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    explain = commands.add_parser("explain", help="explain WebDataset shards with a Ray job", description="Explain every image of WebDataset shards: Ray actors run batched CDAM and write Zarr + Parquet.", epilog=EXPLAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = explain.add_argument_group("data")
    data.add_argument("--shards", nargs="+", required=True, metavar="SPEC", help="tar shards: paths, globs, brace patterns (val-{0000..0063}.tar) or s3://bucket/prefix/...")
    data.add_argument("--output", required=True, metavar="DEST", help="output folder or s3://bucket/prefix")
    model = add_model_flags(explain)
    model.add_argument("--method", choices=["auto", "closed_form", "autograd"], default="auto", help="how maps are computed (default: auto, the closed form where it is exact)")
    model.add_argument("--precision", choices=["float32", "bf16", "tf32"], default="float32", help="precision of the trunk (all blocks but the last) and of Smooth/Integrated's re-runs of the last block on their noisy copies: float32 (exact, TF32 off on CUDA), bf16 autocast, or tf32 (CUDA only; no effect on CPU); vanilla maps and the clean pass that picks the targets are always float32 (default: float32)")
    what = explain.add_argument_group("what to explain")
    what.add_argument("--targets", default="topk:5", help="topk:K | label | classes:3,7,zebra | all | none | text:FILE[:K] (CLIP models: zero-shot classes, one a line, NAME or NAME: prompt | prompt; the top K, default 5) (default: topk:5)")
    what.add_argument("--concepts", nargs="*", default=[], metavar="NAME=SOURCE", help="concept targets: a saved vector FILE, a FOLDER of example images, or for CLIP models text:\"a photo of ...\" or prompts:FILE (one prompt a line, averaged); append :cosine for cosine similarity")
    what.add_argument("--variant", choices=["vanilla", "smooth", "integrated"], default="vanilla", help="vanilla, Smooth or Integrated CDAM (default: vanilla)")
    what.add_argument("--samples", type=int, default=50, metavar="M", help="samples for smooth/integrated (default: 50)")
    what.add_argument("--noise-level", type=float, default=None, help="noise as a fraction of each image's value range (default: 0.05 smooth, 0 integrated)")
    what.add_argument("--seed", type=int, default=0, help="seed of the per-image noise streams (default: 0)")
    out = explain.add_argument_group("output")
    out.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="storage type of maps (default: float32, exact)")
    out.add_argument("--store-basis", action="store_true", help="also store the relevance basis (image, feature, y, x): maps of any class or concept later, without the model")
    out.add_argument("--overwrite", action="store_true", help="replace an existing output made with other settings")
    run = explain.add_argument_group("execution")
    run.add_argument("--batch-size", type=int, default=None, help="images per batch (default: 32 on the CPU; on CUDA the largest power of two from 16 to 512 that fits half the GPU's free memory, measured on a probe batch)")
    run.add_argument("--decode", choices=["cpu", "gpu"], default="cpu", help="where images are decoded and transformed: cpu (Pillow + the model's timm eval transform; bit-reproducible) or gpu (JPEGs by nvJPEG and resized on the actor's GPU: faster, maps differ slightly, see BENCHMARKS.md; other images take the CPU path) (default: cpu)")
    run.add_argument("--decode-workers", type=int, default=0, metavar="N", help="decode processes per actor (1: a thread of the actor; default 0: the node's CPUs divided among the actors it holds)")
    run.add_argument("--actors", type=int, default=0, help="actors (default: one per GPU, else one per --cpus-per-actor CPUs)")
    run.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs (and torch threads) per actor (default: 1)")
    run.add_argument("--gpus-per-actor", type=float, default=1.0, help="GPUs per actor where the cluster has GPUs (default: 1)")
    run.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray on 127.0.0.1)")
    run.add_argument("--dry-run", action="store_true", help="check shards, model and output, print the plan and size estimate, and exit")
    run.add_argument("--strict", action="store_true", help="exit 1 when any sample could not be explained")

    demo = commands.add_parser("demo", help="run the whole job offline on a built-in synthetic dataset with a planted watermark", description="Generate a synthetic WebDataset with a spurious watermark, train a tiny ViT (cached), explain the test split with a local Ray job, audit it (cdam audit), and show how to query the output.")
    demo.add_argument("--output", default="cdam-demo-output", help="output folder (default: ./cdam-demo-output)")
    demo.add_argument("--cache-dir", default=None, help="where the demo data and model are cached (default: ~/.cache/cdam)")
    demo.add_argument("--actors", type=int, default=2, help="actors (default: 2)")

    verify = commands.add_parser("verify", help="check a finished output", description="Check that every shard has a marker, counts agree with the manifest, checksums match, and every metadata row's Zarr data is written.")
    verify.add_argument("output", metavar="DEST", help="output folder or s3://bucket/prefix")

    for name in READING_COMMANDS + TOOL_COMMANDS:
        importlib.import_module(f"jobs.{name}").add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cdam_worker.data import DataError
    from cdam_worker.model import ModelLoadError
    from cdam_worker.storage import StorageError, redact
    from cdam_worker.job import OutputInUseError, OutputLockLost
    from cdam_worker.reading import RunError
    from jobs.explain import ConfigError, JobError

    got_sigterm = threading.Event()
    try:
        with _sigterm_as_interrupt(got_sigterm):
            return _run_command(args)
    except (ConfigError, DataError, ModelLoadError, StorageError, OutputInUseError, OutputLockLost, JobError, RunError) as error:
        print(f"cdam {args.command}: error: {redact(str(error)).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the lock is released, finished shards kept
        terminated = got_sigterm.is_set()
        resume = "; shards finished so far are kept: rerun the same command to resume" if args.command == "explain" else ""
        print(f"cdam {args.command}: stopped by {'SIGTERM' if terminated else 'SIGINT'}{resume}", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)


@contextlib.contextmanager
def _sigterm_as_interrupt(got_sigterm: threading.Event) -> Iterator[None]:
    """SIGTERM (``ray job stop``, a scheduler) raises KeyboardInterrupt, so the job cleans up as on Ctrl-C.

    ``got_sigterm`` tells the two apart afterwards: a handler's exception raised inside a blocking Ray
    call comes back as a plain KeyboardInterrupt, so the exception type cannot.
    """
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield
        return

    def terminate(_signum: int, _frame: object) -> None:
        got_sigterm.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_command(args: argparse.Namespace) -> int:
    """Run the chosen subcommand; returns its exit status."""
    if hasattr(args, "handler"):
        return args.handler(args)
    if args.command == "explain":
        from jobs.explain import run

        return run(args)
    if args.command == "demo":
        from jobs.demo import run_demo

        return run_demo(args)
    from jobs.verify import verify_output

    problems = verify_output(args.output)
    for problem in problems:
        print(problem)
    print(f"{'FAILED' if problems else 'OK'}: {len(problems)} problem(s) in {args.output}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
