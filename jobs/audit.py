"""``cdam audit DEST``: find classes whose maps point at a shortcut (a watermark, a logo, a tag)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from jobs.model_flags import add_address_flag, add_model_flags, model_spec
from jobs.command import add_run_command

if TYPE_CHECKING:
    from cdam_worker.audit import AuditOptions
    from cdam_worker.storage import Storage
    from schemas.manifest import ModelSpec

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
  5. with the run's model (as its manifest records it, or the model flags; --no-model skips it), each
     flagged cluster is tested: its region (the spot, or for a background cue the surroundings) is removed
     from up to --confirm-images of its images (a mark filled with the mean colour around it, a background
     swapped for another class's) and pasted into as many images of other classes; the class's logit drop
     beyond a control edit (bootstrap 95% interval), the top-1 changes and the flips to the class (Wilson
     95% intervals) go into clusters.parquet. A cluster the model does not rely on is not flagged

writes into DEST/audit/ (or --output): classes.parquet, clusters.parquet, images.parquet,
contact-sheets/<class>-<name>.png (flagged classes), summary.json (what was not audited, and why)

examples:
  cdam audit out
  cdam audit s3://bucket/cdam/val --classes zebra,7 --min-images 50
  cdam audit out --by label --json > audit.json
  cdam audit out --no-model                       # the maps only: findings unconfirmed
  cdam audit out --checkpoint model.pt --device cuda --confirm-images 200
"""


HELP = "rank classes by how much their maps point at a shortcut"
DESCRIPTION = "Audit a run's maps for shortcuts (a mark, a background, a cue that tips images over): compare where each class's evidence lies with the other classes', flag the images that carry the cue, cluster, rank the classes, and write the findings (Parquet, contact sheets) into the run."


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = add_run_command(commands, "audit", HELP, DESCRIPTION, EPILOG)
    parser.add_argument(
        "--classes",
        metavar="LIST",
        help="audit only these classes: comma-separated names or indices (default: every class with images)",
    )
    parser.add_argument(
        "--by", choices=["pred", "label"], default="pred", help="group images by predicted class (default) or by label"
    )
    parser.add_argument(
        "--min-images",
        type=int,
        default=20,
        metavar="N",
        help="classes with fewer images (with a stored map of the class) are not audited (default: 20)",
    )
    parser.add_argument(
        "--output",
        dest="audit_output",
        metavar="DIR",
        help="where the audit's files go: a folder or s3:// prefix (default: DEST/audit/)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an audit made with other --by, --classes or --min-images in the same folder (default: refuse; --output DIR keeps both)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the summary and the ranked classes as JSON instead of a table"
    )
    parser.add_argument(
        "--no-model",
        action="store_true",
        help="do not confirm the flagged clusters with the model (the findings stay unconfirmed)",
    )
    parser.add_argument(
        "--confirm-images",
        type=int,
        default=64,
        metavar="N",
        help="images of each flagged cluster, and of other classes, edited to confirm it (default: 64)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the confirmation's samples, control places and bootstrap (default: 0)",
    )
    parser.add_argument(
        "--device", default=None, help="where the model runs: cpu or cuda[:N] (default: cuda if available, else cpu)"
    )
    add_address_flag(parser, "one per block of rows read and one per class audited")
    add_model_flags(parser, "to confirm the flagged clusters")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    return audit(
        args.output,
        args.classes,
        args.by,
        args.min_images,
        args.audit_output,
        args.json,
        overwrite=args.overwrite,
        confirm=not args.no_model,
        model=model_spec(args),
        confirm_images=args.confirm_images,
        seed=args.seed,
        device=args.device,
        address=args.address,
    )


def audit(
    dest: str,
    class_list: str | None = None,
    by: str = "pred",
    min_images: int = 20,
    audit_output: str | None = None,
    as_json: bool = False,
    overwrite: bool = False,
    confirm: bool = True,
    model: ModelSpec | None = None,
    confirm_images: int = 64,
    seed: int = 0,
    device: str | None = None,
    address: str | None = None,
) -> int:
    """Audit the run at ``dest``, confirm its flagged clusters with the model (``model``, else the manifest's;
    ``confirm=False``: unconfirmed) and print the ranked classes (the flags of the same names); the exit status.
    An audit made with other options in the same folder is replaced only with ``overwrite``."""
    from tqdm import tqdm

    from cdam_worker.audit import (
        AuditOptions,
        apply_confirmations,
        audit_run,
        ranked_table,
        write_audit,
    )
    from cdam_worker.reading import RunError, open_run
    from cdam_worker.storage import Storage

    run_ = open_run(dest)
    for note in run_.skipped:
        print(f"note: {note}", file=sys.stderr)
    classes = tuple(run_.class_index(c.strip()) for c in class_list.split(",") if c.strip()) if class_list else ()
    options = AuditOptions(by=by, classes=classes, min_images=min_images)
    loaded, unconfirmed = None, "findings unconfirmed: --no-model"
    if confirm:  # checked before the audit reads anything; torch only for the model's tests
        from cdam_worker.audit import ConfirmSettings, confirm_clusters

        settings = ConfirmSettings(
            images=confirm_images, recipients=confirm_images, seed=seed, device=device or _default_device()
        )
        try:
            loaded = run_.load_model(model)
        except RunError as error:
            if model is not None:  # the model asked for by flags must load
                raise
            unconfirmed = f"findings unconfirmed: {error}"
    storage = Storage.from_url(audit_output) if audit_output else run_.storage.child("audit")
    with run_.exclusive("audit") as check_lock:
        if not overwrite:
            _refuse_another_audit(storage, options, run_.class_names)
        with tqdm(
            total=None if classes else run_.index.num_rows,
            unit="img",
            desc="reading maps",
            file=sys.stderr,
            disable=None,
        ) as bar:
            result = audit_run(run_, options, progress=bar.update, address=address)
        if loaded is not None:
            result = apply_confirmations(result, *confirm_clusters(run_, result, loaded, settings))
        else:
            result.confirmation_note = unconfirmed
        summary = write_audit(run_, result, options, storage, check_lock)
    for note in result.skipped[len(run_.skipped) :]:
        print(f"note: {note}", file=sys.stderr)
    for name, reason in result.not_audited.items():
        print(f"not audited: {name}: {reason}", file=sys.stderr)
    if result.blind_spot.found:
        print(f"warning: {result.blind_spot.message()}", file=sys.stderr)
    if as_json:
        print(json.dumps({**summary, "classes": result.classes.to_pylist()}, indent=2))
        return 0
    print(ranked_table(result))
    print(f"\n{'note' if loaded is None else 'confirmation'}: {result.confirmation_note}")
    flagged = summary["classes_flagged"]
    print(
        f"\n{len(flagged)} of {len(result.audited)} audited classes flagged"
        + (f": {', '.join(flagged)}" if flagged else "")
        + (
            "; these maps are in CDAM's blind spot (see the warning): for the classes not flagged that means 'cannot tell'"
            if result.blind_spot.found
            else ""
        )
    )
    print(
        f"files: {storage.url}/ (classes.parquet, clusters.parquet, images.parquet, summary.json"
        + (
            f", {len(summary['contact_sheets'])} contact sheet(s) in contact-sheets/)"
            if summary["contact_sheets"]
            else ")"
        )
    )
    return 0


def _refuse_another_audit(storage: Storage, options: AuditOptions, class_names: list[str]) -> None:
    """RunError (one line) when ``storage`` holds an audit made with other options: rerunning the same audit replaces
    it, another one needs --overwrite or its own --output."""
    from cdam_worker.reading import RunError
    from schemas.audit import audit_flags

    try:
        previous = json.loads(storage.get("summary.json"))
    except FileNotFoundError:
        return
    wanted = {"by": options.by, "options": {"classes": list(options.classes), "min_images": options.min_images}}
    if audit_flags(previous, class_names) != audit_flags(wanted, class_names):
        raise RunError(
            f"{storage.url}/ holds an audit made with {audit_flags(previous, class_names)}; this one is "
            f"{audit_flags(wanted, class_names)}: give --overwrite to replace it, or --output DIR to keep both"
        )


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
