"""``cdam export-fiftyone DEST OUT``: a run as a FiftyOne dataset folder (images, heatmaps, audit clusters)."""

from __future__ import annotations

import argparse
import sys
from jobs.command import add_run_command

EPILOG = """\
OUT gets FiftyOne's JSON dataset format: samples.json, metadata.json and data/ (each image as the model
saw it, the frame the maps cover); every path is relative to OUT, so the folder can be moved. Each stored
map is a FiftyOne Heatmap field inside the samples: cdam_<k> (slot k; its class in cdam_<k>_target) holds
the signed float32 map with range [-s, s] (s its largest |value|), which FiftyOne paints with opacity
|value| / s (no relevance shows the image; choose a diverging colorscale and "color by value" for red
and blue), and attention the attention less its minimum. Audit clusters become the fields audit_cluster,
audit_x, audit_y, audit_score and the tags cluster-<k> and audit-flagged. FiftyOne is not needed to write
it; to open it (pip install -e '.[fiftyone]'; checked with fiftyone 1.22.1):

  python -c 'import fiftyone as fo; fo.launch_app(fo.Dataset.from_dir("OUT", fo.types.FiftyOneDataset)).wait()'

examples:
  cdam export-fiftyone cdam-demo-output demo-fiftyone
"""


HELP = "write a run as a FiftyOne dataset folder"
DESCRIPTION = "Write a run as a FiftyOne dataset folder: images, every stored map as a signed Heatmap with its range, predictions, labels and the audit's clusters as fields and tags."


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = add_run_command(commands, "export-fiftyone", HELP, DESCRIPTION, EPILOG)
    parser.add_argument("out", metavar="OUT", help="a new (or empty) local folder for the FiftyOne dataset")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cdam_worker.reading import open_run
    from cdam_worker.views.fiftyone import export_fiftyone

    run_ = open_run(args.output)
    for note in run_.skipped:
        print(f"note: {note}", file=sys.stderr)
    counts = export_fiftyone(run_, Path(args.out))
    left_out = (
        f"; left out: {counts['unreadable_images']} unreadable image(s), {counts['missing_maps']} map(s) not written (NaN)"
        if counts["unreadable_images"] or counts["missing_maps"]
        else ""
    )
    print(f"wrote {counts['samples']} samples to {args.out}{left_out}", file=sys.stderr)
    print(
        f"open it: python -c 'import fiftyone as fo; fo.launch_app(fo.Dataset.from_dir(\"{args.out}\", fo.types.FiftyOneDataset)).wait()'",
        file=sys.stderr,
    )
    return 0
