"""``cdam report DEST -o report.html``: one self-contained HTML file (no server, no network) over a run."""

from __future__ import annotations

import argparse
import sys
from jobs.command import add_run_command

EPILOG = """\
The file holds the run's overview, the audit's class leaderboard, and for the most suspicious classes
(--classes, by the audit's rank; without an audit, the classes with the most images) a gallery of images
chosen by the audit (each cluster's medoid and its highest-scoring images) and the clusters' prototypes.
Pictures are inlined (JPEG data: URIs); the file opens from disk in any browser.

examples:
  cdam report cdam-demo-output -o demo-report.html
  cdam report s3://bucket/cdam/val -o val.html --classes 50 --per-class 16
"""


HELP = "a self-contained HTML report of a run"
DESCRIPTION = "Write one self-contained HTML file with the run's overview, the audit's class leaderboard, per-class galleries and prototypes."


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = add_run_command(commands, "report", HELP, DESCRIPTION, EPILOG)
    parser.add_argument("-o", "--out", required=True, metavar="FILE", help="the HTML file to write")
    parser.add_argument("--classes", type=int, default=20, metavar="N", help="classes with a gallery (default: 20)")
    parser.add_argument("--per-class", type=int, default=12, metavar="M", help="images per class gallery (default: 12)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from cdam_worker.reading import RunError, open_run
    from cdam_worker.views.report import build_report

    if args.classes < 0 or args.per_class < 1:
        raise RunError(
            f"--classes {args.classes} / --per-class {args.per_class}: expected --classes >= 0 and --per-class >= 1"
        )
    run_ = open_run(args.output)
    html, notes = build_report(run_, n_classes=args.classes, per_class=args.per_class)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    try:
        with open(args.out, "w", encoding="utf-8") as file:
            file.write(html)
    except OSError as error:
        raise RunError(f"cannot write {args.out}: {error.strerror or error}") from None
    print(f"wrote {args.out} ({len(html.encode()) / 2**20:.1f} MiB)", file=sys.stderr)
    return 0
