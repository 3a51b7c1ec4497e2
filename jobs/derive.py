"""``cdam derive DEST --targets SPEC [--concepts ...] --name NAME``: maps of other classes or concepts from the
stored basis, written into the run as ``derived/NAME`` (library: ``cdam_worker.derive``)."""

from __future__ import annotations

import argparse
import sys

from jobs.model_flags import add_address_flag, add_model_flags, model_spec
from jobs.command import add_run_command

EPILOG = """\
writes, under DEST:
  cdam.zarr/derived/NAME/cdam          (image, target, y, x): the same rows and chunks as cdam
  cdam.zarr/derived/NAME/target_class  (image, target): class per slot, -1 concept, -2 not derived
  derived/NAME/metadata.parquet        key, row, targets, target_names, relevance_pos_sum/neg_sum/argmax
  derived/NAME/manifest.json, markers/, shards/   settings, per-shard markers and tables (resume, verify)

needs a run made with --store-basis; classes need no model. Rerunning the same command resumes (and
derives shards the run finished since); other settings under the same NAME need --overwrite.

examples:
  cdam derive out --targets classes:zebra,7 --name zebra7
  cdam derive s3://bucket/cdam/val --targets none --concepts stripes=examples/stripes/ --name stripes
  python: derive_maps(open_run("out"), "topk:3", keys=["val-000001"])   # cdam_worker.derive; in memory, nothing written
"""


HELP = "derive maps of other classes or concepts from the stored basis"
DESCRIPTION = "Compute the CDAM of any classes or concepts for every image of a run made with --store-basis (one matrix product per image, no model for classes) and write them into the run."


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = add_run_command(commands, "derive", HELP, DESCRIPTION, EPILOG)
    parser.add_argument(
        "--targets",
        default="none",
        help="topk:K | label | classes:3,7,zebra | all | none (default: none, concepts only)",
    )
    parser.add_argument(
        "--concepts",
        nargs="*",
        default=[],
        metavar="NAME=FILE",
        help='concept targets: a saved vector, a folder of example images (embedded with the run\'s model), or for CLIP models text:"a photo of ..." or prompts:FILE; append :cosine for cosine similarity',
    )
    parser.add_argument(
        "--name", required=True, help="name of the derived maps (letters, digits, _ . -): written under derived/NAME"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace derived maps of this name made with other settings"
    )
    add_address_flag(parser, "one task per shard")
    add_model_flags(parser, "needed only to embed a folder of concept examples")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from cdam_worker.derive import check_name, plan_derive, write_derived
    from cdam_worker.reading import open_run

    run_ = open_run(args.output)
    check_name(args.name)
    plan = plan_derive(run_, args.targets, args.concepts, model_spec(args))
    for note in run_.skipped:
        print(f"note: {note}", file=sys.stderr)
    summary = write_derived(run_, plan, args.name, overwrite=args.overwrite, address=args.address)
    for line in summary.skipped[:10]:
        print(f"note: image {line}: not derived", file=sys.stderr)
    if len(summary.skipped) > 10:
        print(
            f"note: ... and {len(summary.skipped) - 10} more images not derived (derived/{args.name}/markers/ name up to 20 per shard)",
            file=sys.stderr,
        )
    print(
        f"derived {args.name}: {plan.n_slots} map(s) per image for {summary.images} images in {summary.shards_derived} shard(s) "
        f"({summary.shards_already} derived before), {len(summary.skipped)} skipped; status {summary.status}"
    )
    print(f"output: {run_.url}/derived/{args.name} and {run_.url}/cdam.zarr/derived/{args.name}")
    if summary.status != "complete":
        print(
            f"note: {sum(not s.complete for s in run_.shards)} shard(s) of the run are not complete yet: rerun this command once they are",
            file=sys.stderr,
        )
    return 0
