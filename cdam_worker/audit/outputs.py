"""Write an audit's files (one writer per file) and render its ranked table.

Below the audit folder (``DEST/audit/`` by default): ``classes.parquet``, ``clusters.parquet``,
``images.parquet``, ``contact-sheets/<class index>-<safe class name>-cluster-<k>.png`` (one per flagged cluster: spot
tiles for marks, whole images for a background/context cue), and
``summary.json``, written last. Sheets of an earlier audit that no longer apply are deleted.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cdam_worker.audit.contact_sheet import contact_sheet
from cdam_worker.audit.cues import KIND_WORDS
from cdam_worker.audit.pipeline import AuditOptions, AuditResult, ClassAudit
from cdam_worker.audit.scoring import ClusterReport
from cdam_worker.reading import Run
from cdam_worker.storage import Storage
from schemas.audit import contact_sheet_path

SHEETS_FOLDER = "contact-sheets"
TABLE_ROWS = 20


def write_audit(
    run: Run, result: AuditResult, options: AuditOptions, storage: Storage, check_lock: Callable[[], None]
) -> dict:
    """Write every file of the audit into ``storage``; returns the summary (as written to ``summary.json``)."""
    for name, table in (("classes", result.classes), ("clusters", result.clusters), ("images", result.images)):
        check_lock()
        storage.put(f"{name}.parquet", _parquet_bytes(table))
    sheets: dict[str, dict[str, str]] = {}
    notes: list[str] = []
    for audit in result.audited:
        for cluster in (c for c in audit.clusters if c.flagged):
            check_lock()
            path, sheet_notes = _write_sheet(run, result, audit, cluster, storage)
            sheets.setdefault(audit.name, {})[str(cluster.cluster)] = path
            notes += sheet_notes
    for stale in set(storage.list(SHEETS_FOLDER)) - {
        path for by_cluster in sheets.values() for path in by_cluster.values()
    }:
        storage.delete(stale)
    summary = result.summary(run, options) | {
        "output": storage.url,
        "contact_sheets": sheets,
        "contact_sheet_notes": notes,
    }
    check_lock()
    storage.put("summary.json", json.dumps(summary, indent=2, sort_keys=True).encode())
    return summary


def _write_sheet(
    run: Run, result: AuditResult, audit: ClassAudit, cluster: ClusterReport, storage: Storage
) -> tuple[str, list[str]]:
    """Write the contact sheet of one flagged cluster of ``audit``; its path and notes on images not shown."""
    members = np.flatnonzero(audit.labels == cluster.cluster)
    order = members[np.argsort(-audit.image_scores[members], kind="stable")]
    positions = audit.positions[order]
    what = KIND_WORDS.get(cluster.kind, "flagged")
    title = f"{audit.index} {audit.name}, cluster {cluster.cluster}: {what}, {cluster.place}; {len(order)} images"
    whole = audit.image_kinds[order] == "background"  # a background cue shows as whole images
    png, notes = contact_sheet(
        run,
        result.gathered.keys[positions].tolist(),
        result.gathered.class_maps[positions],
        audit.spots[order],
        title,
        whole,
    )
    path = contact_sheet_path(audit.index, audit.name, cluster.cluster)
    storage.put(path, png)
    return path, notes


def ranked_table(result: AuditResult) -> str:
    """The classes, most suspicious first (flagged ones lead), at most ``TABLE_ROWS`` lines; ``model`` says whether
    the model relies on the class's tested clusters ("-": none tested)."""
    lines = [f"{'rank':>4}  {'class':<20} {'images':>6} {'score':>5}  {'':7}  {'model':<10}  reasons"]
    for audit in result.audited[:TABLE_ROWS]:
        flag = "FLAGGED" if audit.flagged else ""
        tests = [
            result.confirmations[(audit.index, c.cluster)]
            for c in audit.clusters
            if (audit.index, c.cluster) in result.confirmations
        ]
        model = "-" if not tests else "relies" if any(t.relied_on for t in tests) else "not used"
        lines.append(
            f"{audit.rank:>4}  {audit.name[:20]:<20} {len(audit.positions):>6} {audit.score:>5.2f}  {flag:7}  {model:<10}  {audit.reasons}"
        )
    if len(result.audited) > TABLE_ROWS:
        lines.append(f"      ... {len(result.audited) - TABLE_ROWS} more classes in classes.parquet")
    return "\n".join(lines)


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()
