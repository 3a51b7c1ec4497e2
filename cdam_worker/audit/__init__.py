"""``cdam audit``: find the classes whose CDAM maps point at a shortcut, and the images that show it.

For each class (the images predicted as it, or labelled with it), using the stored map of that class
against the image's competing classes (its other stored class targets):

1. ``gather``: read the maps, one pass over the run in row order;
2. ``features``: per image, where the class-specific evidence lies and how much of it sits on one
   small spot, wherever it is (translation-invariant, so moving marks count as well as fixed ones);
3. ``clustering``: a sparse k-nearest-neighbour graph, spectral embedding, the number of clusters from
   the eigengap, k-means, 2-D coordinates;
4. ``scoring``: per cluster its size, share, label purity, prototype, medoid, where its evidence lies and
   a suspicion score; per class a score, a rank and reasons in words; flags above a threshold;
5. ``blind_spot``: whether the maps can see anything at all (a flat last attention);
6. ``confirm``: with the run's model, a counterfactual test of each flagged cluster (remove the region its
   maps point at, paste it into other classes' images); a cluster the model does not rely on is unflagged;
7. ``outputs``, ``contact_sheet``: Parquet tables, contact sheets and a summary in ``DEST/audit/``.
"""

from cdam_worker.audit.confirm import ConfirmSettings, confirm_clusters
from cdam_worker.audit.outputs import ranked_table, write_audit
from cdam_worker.audit.pipeline import AuditOptions, AuditResult, apply_confirmations, audit_run

__all__ = ["AuditOptions", "AuditResult", "ConfirmSettings", "apply_confirmations", "audit_run", "confirm_clusters", "ranked_table",
           "write_audit"]
