"""``cdam audit``: find the classes whose CDAM maps point at a shortcut, and the images that show it.

For each class (the images predicted as it, or labelled with it), using the stored map of that class
against the image's competing classes (its other stored class targets):

1. ``gather``: read the maps, one pass over the run in row order;
2. ``features``: per image, where the class-specific evidence lies and how much of it sits on one
   small spot, wherever it is (translation-invariant, so moving marks count as well as fixed ones);
3. ``cues``: the findings from the maps alone, against the other classes' images (evidence off the
   class's usual region: a mark at a place, or a background/context cue), per image and per class,
   and label disagreement far beyond the run's usual confusions (a cue that tips images over); ``appearance``:
   a mark's images found again by its look in their pixels (a mark that moves, or lies where objects do);
4. ``clustering``: a sparse k-nearest-neighbour graph, spectral embedding, the number of clusters from
   the eigengap, k-means, 2-D coordinates;
5. ``scoring``: per cluster (one per finding, then the spectral clusters of the other images) its size,
   share, label purity, prototype, medoid, where its evidence lies, its kind; per class reasons in words;
6. ``blind_spot``: whether the maps can see anything at all (a flat last attention);
7. ``confirm``: with the run's model, a counterfactual test of each flagged cluster (remove the region its
   maps point at, paste it into other classes' images); a cluster the model does not rely on is unflagged;
8. ``outputs``, ``contact_sheet``: Parquet tables, contact sheets and a summary in ``DEST/audit/``.

The names are imported when first used, so that reading an audit (``cdam report``, the views) and auditing
with ``--no-model`` do not import the model's maths (torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cdam_worker.lazy_exports import lazy_exports

_EXPORTS = {
    "ConfirmSettings": "cdam_worker.audit.confirm",
    "confirm_clusters": "cdam_worker.audit.confirm",
    "ranked_table": "cdam_worker.audit.outputs",
    "write_audit": "cdam_worker.audit.outputs",
    "AuditOptions": "cdam_worker.audit.pipeline",
    "AuditResult": "cdam_worker.audit.pipeline",
    "apply_confirmations": "cdam_worker.audit.pipeline",
    "audit_run": "cdam_worker.audit.pipeline",
}

__all__ = [  # the same names as _EXPORTS, spelled out for linters and type checkers
    "AuditOptions",
    "AuditResult",
    "ConfirmSettings",
    "apply_confirmations",
    "audit_run",
    "confirm_clusters",
    "ranked_table",
    "write_audit",
]

if TYPE_CHECKING:
    from cdam_worker.audit.confirm import ConfirmSettings, confirm_clusters
    from cdam_worker.audit.outputs import ranked_table, write_audit
    from cdam_worker.audit.pipeline import AuditOptions, AuditResult, apply_confirmations, audit_run


__getattr__ = lazy_exports(__name__, _EXPORTS)
