"""``cdam show DEST --key KEY``: one image with its map overlaid, a colour bar and the class name, as a PNG."""

from __future__ import annotations

import argparse
import sys
from jobs.command import add_run_command

EPILOG = """\
The picture is the image as the model saw it (resized and cropped by the run's eval transform) with the
map upsampled onto it for display; red = evidence for the class, blue = against, on the map's own
symmetric scale (the colour bar's ends are ±its largest |value|). A --target the run did not store for
the image is looked up among the maps `cdam derive` wrote into the run (a concept or class of a
derivation; NAME/TARGET picks the derivation NAME).

examples:
  cdam show cdam-demo-output --key test-000042 -o circle.png
  cdam show s3://bucket/cdam/val --key n01440764/ILSVRC2012_val_00000293 --target tench -o fig.png
  cdam show out --key k1 --target attention -o attention.png
  cdam show cdam-demo-output --key test-000003 --target mark -o mark.png     # after cdam derive ... --concepts mark=mark.pt
"""


HELP = "one image with its map overlaid, as a PNG"
DESCRIPTION = "Draw one image of a run with a stored map overlaid, the colour bar and the class name (for papers and bug reports)."


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = add_run_command(commands, "show", HELP, DESCRIPTION, EPILOG)
    parser.add_argument("--key", required=True, help="the image's WebDataset key")
    parser.add_argument(
        "--target",
        metavar="CLASS",
        help="class name or index, a concept name (also of a derived map: NAME or DERIVATION/NAME), or 'attention' (default: the predicted class)",
    )
    parser.add_argument("-o", "--out", required=True, metavar="FILE", help="the PNG to write")
    parser.add_argument("--size", type=int, default=512, help="pixels of the picture's longer side (default: 512)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from cdam_worker.reading import RunError, open_run
    from cdam_worker.views.show import show_figure

    if not 32 <= args.size <= 4096:
        raise RunError(f"--size {args.size}: expected 32 to 4096 pixels")
    run_ = open_run(args.output)
    for note in run_.skipped:
        print(f"note: {note}", file=sys.stderr)
    picture, described = show_figure(run_, args.key, args.target, args.size)
    try:
        picture.save(args.out, format="PNG")
    except OSError as error:
        raise RunError(f"cannot write {args.out}: {error.strerror or error}") from None
    print(f"{args.out}: {described}", file=sys.stderr)
    return 0
