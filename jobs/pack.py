"""``cdam pack SRC OUTDIR``: pack a folder of images into WebDataset shards for ``cdam explain``."""

from __future__ import annotations

import argparse
import os
import sys
from jobs.command import add_command

MAX_LISTED = 20
"""Skipped files printed at most; index.json lists them all."""

EPILOG = """\
layouts:
  imagenet  SRC/<wnid>/<image>: the label (cls) is timm's ImageNet-1k index of the wnid folder
  csv       the images named in --labels FILE.csv (header: filename,label; paths relative to SRC,
            integer labels)
  flat      every image below SRC, no labels

output (OUTDIR, a folder or s3://bucket/prefix):
  shard-000000.tar, ...  samples <key>.cls (if labelled), <key>.<ext> (the image file, unchanged),
                         <key>.json ({"filename": path relative to SRC}); key = the relative path
                         without extension, dots replaced by '_'
  index.json             every shard (samples, bytes) and every file not packed, with the reason

Every image is decoded as the job decodes it; files that cannot be read or decoded are skipped, listed
on stderr (the first 20) and in index.json (all; written even when nothing could be packed, which exits 2).
The same folder always gives byte-identical shards.

examples:
  cdam pack /data/imagenet/val packed/val --layout imagenet
  cdam pack photos s3://bucket/photos --labels photos.csv --maxcount 500
  cdam explain --shards 'packed/val/shard-{000000..000049}.tar' --output out --targets label ...
"""


HELP = "pack a folder of images into WebDataset shards"
DESCRIPTION = "Pack a folder of image files into WebDataset tar shards that cdam explain reads, with labels from the folder layout or a CSV file."


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = add_command(commands, "pack", HELP, DESCRIPTION, EPILOG)
    parser.add_argument("src", metavar="SRC", help="the folder of images")
    parser.add_argument("outdir", metavar="OUTDIR", help="output folder or s3://bucket/prefix")
    parser.add_argument(
        "--layout",
        choices=["imagenet", "csv", "flat"],
        default=None,
        help="how SRC is organised and labelled (default: csv with --labels, else flat)",
    )
    parser.add_argument("--labels", metavar="FILE.csv", help="a CSV with the columns filename,label (the csv layout)")
    parser.add_argument("--maxcount", type=int, default=1000, help="samples per shard at most (default: 1000)")
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="processes reading and checking the files (default: the number of CPUs)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the shards and index.json of an earlier pack in OUTDIR"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from cdam_worker.shards.packing import PackError, pack

    layout = args.layout or ("csv" if args.labels else "flat")
    result = pack(
        args.src,
        args.outdir,
        layout=layout,
        labels=args.labels,
        maxcount=args.maxcount,
        workers=args.workers,
        overwrite=args.overwrite,
    )
    for skipped in result.skipped[:MAX_LISTED]:
        print(f"cdam pack: skipped {skipped.file}: {skipped.reason}", file=sys.stderr)
    if len(result.skipped) > MAX_LISTED:
        print(f"cdam pack: ... and {len(result.skipped) - MAX_LISTED} more skipped files", file=sys.stderr)
    outdir = args.outdir.rstrip("/")
    if not result.shards:
        raise PackError(
            f"no image to pack below {args.src} (layout {layout}): {len(result.skipped)} file(s) skipped, listed in {outdir}/index.json"
        )
    print(
        f"packed {result.n_samples} images into {len(result.shards)} shard(s), {result.n_bytes / 2**20:.1f} MiB, in {outdir}"
        + (f"; {len(result.skipped)} file(s) skipped, listed in {outdir}/index.json" if result.skipped else "")
    )
    shards = "000000" if len(result.shards) == 1 else f"{{000000..{len(result.shards) - 1:06d}}}"
    print(f"next: cdam explain --shards '{outdir}/shard-{shards}.tar' --output DEST --checkpoint FILE ...")
    return 0
