"""``cdam audit DEST``: find classes whose maps point at a shortcut (a watermark, a logo, a tag)."""

from __future__ import annotations

import argparse
import json
import sys

EPILOG = """\
per class (the images predicted as it, or labelled with it with --by label), using the stored map of
that class against the image's other stored class targets, and the other classes' images of the run:
  1. per image: where its class-specific evidence lies, how much of it sits on one small spot, and its
     share off the class's usual region (where the other classes' evidence lies)
  2. findings from the maps alone (no mistakes or labels needed): a class with far more images off
     place than the other classes (binomial test, Bonferroni, at 0.01); its images past the cut that
     best separates it from the other classes are flagged, as a mark at a place (evidence on one spot)
     or a background/context cue (spread over the surroundings; a scene class looks like this too)
  3. label disagreement, one more finding: images labelled as other classes far more often than the
     run's usual confusions (a cue that tips other classes' images over)
  4. clusters (a k-nearest-neighbour graph, spectral embedding, the eigengap), per cluster its size,
     share, label purity, prototype (mean map), medoid image, where the evidence lies, its kind

writes into DEST/audit/ (or --output): classes.parquet, clusters.parquet, images.parquet,
contact-sheets/<class>-<name>.png (flagged classes), summary.json (what was not audited, and why)

examples:
  cdam audit out
  cdam audit s3://bucket/cdam/val --classes zebra,7 --min-images 50
  cdam audit out --by label --json > audit.json
"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("audit", help="rank classes by how much their maps point at a shortcut", description="Audit a run's maps for shortcuts (a mark, a background, a cue that tips images over): compare where each class's evidence lies with the other classes', flag the images that carry the cue, cluster, rank the classes, and write the findings (Parquet, contact sheets) into the run.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", metavar="DEST", help="the run: output folder or s3://bucket/prefix")
    parser.add_argument("--classes", metavar="LIST", help="audit only these classes: comma-separated names or indices (default: every class with images)")
    parser.add_argument("--by", choices=["pred", "label"], default="pred", help="group images by predicted class (default) or by label")
    parser.add_argument("--min-images", type=int, default=20, metavar="N", help="classes with fewer images (with a stored map of the class) are not audited (default: 20)")
    parser.add_argument("--output", dest="audit_output", metavar="DIR", help="where the audit's files go: a folder or s3:// prefix (default: DEST/audit/)")
    parser.add_argument("--json", action="store_true", help="print the summary and the ranked classes as JSON instead of a table")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from cdam_worker.audit import AuditOptions, audit_run, ranked_table, write_audit
    from cdam_worker.reading import open_run
    from cdam_worker.storage import Storage

    run_ = open_run(args.output)
    for note in run_.skipped:
        print(f"note: {note}", file=sys.stderr)
    classes = tuple(run_.class_index(c.strip()) for c in args.classes.split(",") if c.strip()) if args.classes else ()
    options = AuditOptions(by=args.by, classes=classes, min_images=args.min_images)
    storage = Storage.from_url(args.audit_output) if args.audit_output else run_.storage.child("audit")
    with run_.exclusive("audit") as check_lock:
        with tqdm(total=None if classes else run_.index.num_rows, unit="img", desc="reading maps", file=sys.stderr, disable=None) as bar:
            result = audit_run(run_, options, progress=bar.update)
        summary = write_audit(run_, result, options, storage, check_lock)
    for note in result.skipped[len(run_.skipped):]:
        print(f"note: {note}", file=sys.stderr)
    for name, reason in result.not_audited.items():
        print(f"not audited: {name}: {reason}", file=sys.stderr)
    if result.blind_spot.found:
        print(f"warning: {result.blind_spot.message()}", file=sys.stderr)
    if args.json:
        print(json.dumps({**summary, "classes": result.classes.to_pylist()}, indent=2))
        return 0
    print(ranked_table(result))
    flagged = summary["classes_flagged"]
    print(f"\n{len(flagged)} of {len(result.audited)} audited classes flagged" + (f": {', '.join(flagged)}" if flagged else "")
          + ("; these maps are in CDAM's blind spot (see the warning): for the classes not flagged that means 'cannot tell'" if result.blind_spot.found else ""))
    print(f"files: {storage.url}/ (classes.parquet, clusters.parquet, images.parquet, summary.json"
          + (f", {len(summary['contact_sheets'])} contact sheet(s) in contact-sheets/)" if summary["contact_sheets"] else ")"))
    return 0
