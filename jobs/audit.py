"""``cdam audit DEST``: find classes whose maps point at a shortcut (a watermark, a logo, a tag)."""

from __future__ import annotations

import argparse
import json
import sys

EPILOG = """\
per class (the images predicted as it, or labelled with it with --by label), using the stored map of
that class against the image's other stored class targets:
  1. per image: how much of the class's positive evidence sits on one small spot (wherever it is),
     how much of the spot's evidence no competing class shares, where the evidence lies
  2. a sparse k-nearest-neighbour graph, spectral embedding, clusters (their number from the eigengap)
  3. per cluster: size, share, label purity, prototype (mean map), medoid image, where the evidence lies
  4. a suspicion score per image, cluster and class (concentration x specificity, raised when the
     images are labelled as other classes); a cluster is flagged when its score is at least 0.5

writes into DEST/audit/ (or --output): classes.parquet, clusters.parquet, images.parquet,
contact-sheets/<class>-<name>.png (flagged classes), summary.json (what was not audited, and why)

examples:
  cdam audit out
  cdam audit s3://bucket/cdam/val --classes zebra,7 --min-images 50
  cdam audit out --by label --json > audit.json
"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("audit", help="rank classes by how much their maps point at a shortcut", description="Audit a run's maps for shortcuts: cluster each class's images by where their class-specific evidence lies, score and rank the classes, and write the findings (Parquet, contact sheets) into the run.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", metavar="DEST", help="the run: output folder or s3://bucket/prefix")
    parser.add_argument("--classes", metavar="LIST", help="audit only these classes: comma-separated names or indices (default: every class with images)")
    parser.add_argument("--by", choices=["pred", "label"], default="pred", help="group images by predicted class (default) or by label")
    parser.add_argument("--min-images", type=int, default=20, metavar="N", help="classes with fewer images (with a stored map of the class) are not audited (default: 20)")
    parser.add_argument("--output", dest="audit_output", metavar="DIR", help="where the audit's files go: a folder or s3:// prefix (default: DEST/audit/)")
    parser.add_argument("--json", action="store_true", help="print the summary and the ranked classes as JSON instead of a table")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    return audit(args.output, args.classes, args.by, args.min_images, args.audit_output, args.json)


def audit(dest: str, class_list: str | None = None, by: str = "pred", min_images: int = 20, audit_output: str | None = None, as_json: bool = False) -> int:
    """Audit the run at ``dest`` and print the ranked classes (the flags of the same names); returns the exit status."""
    from tqdm import tqdm

    from cdam_worker.audit import AuditOptions, audit_run, ranked_table, write_audit
    from cdam_worker.reading import open_run
    from cdam_worker.storage import Storage

    run_ = open_run(dest)
    for note in run_.skipped:
        print(f"note: {note}", file=sys.stderr)
    classes = tuple(run_.class_index(c.strip()) for c in class_list.split(",") if c.strip()) if class_list else ()
    options = AuditOptions(by=by, classes=classes, min_images=min_images)
    storage = Storage.from_url(audit_output) if audit_output else run_.storage.child("audit")
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
    if as_json:
        print(json.dumps({**summary, "classes": result.classes.to_pylist()}, indent=2))
        return 0
    print(ranked_table(result))
    flagged = summary["classes_flagged"]
    print(f"\n{len(flagged)} of {len(result.audited)} audited classes flagged" + (f": {', '.join(flagged)}" if flagged else "")
          + ("; these maps are in CDAM's blind spot (see the warning): for the classes not flagged that means 'cannot tell'" if result.blind_spot.found else ""))
    print(f"files: {storage.url}/ (classes.parquet, clusters.parquet, images.parquet, summary.json"
          + (f", {len(summary['contact_sheets'])} contact sheet(s) in contact-sheets/)" if summary["contact_sheets"] else ")"))
    return 0
