"""CDAM maps from a run's stored relevance basis (spec section 3), without the model.

For every image the basis B (D x N) holds ``J Z^T``; the map of a target direction g is ``g . B`` (one
matrix product per image). Class c's direction is the head's row ``W[c]`` (stored with the basis as
``cdam.zarr/head``); a dot-product concept's is its vector v, a cosine concept's ``d cos(h, v) / dh`` at the
image's stored embedding h. The directions and the product are the engine's own functions.

For Smooth and Integrated runs the stored basis is the mean of the altered inputs' bases, so class and
dot-product concept maps derived from it are exactly the run's; a cosine concept's direction depends on
the embedding, which the engine takes from each altered input and this module from the clean one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from cdam_worker.maps.closed_form import maps_from_basis
from cdam_worker.maps.concepts import ConceptError, load_concept
from cdam_worker.maps.engine import CDAMExplainer, class_directions
from cdam_worker.maps.targets import Concept, TargetSpec, concept_directions
from cdam_worker.reading.run import READ_ROWS, Run, RunError
from schemas.manifest import ModelSpec
from schemas.zarr_layout import INT_FILL

if TYPE_CHECKING:
    import xarray as xr


@dataclass(frozen=True)
class DerivePlan:
    """What to derive for each image: class slots by ``spec``, then one slot per concept."""

    spec: TargetSpec
    concepts: tuple[Concept, ...]
    head_weight: torch.Tensor | None  # (C, D) the stored head's rows: the class directions
    class_names: tuple[str, ...]

    @property
    def n_slots(self) -> int:
        return self.spec.num_slots(len(self.class_names)) + len(self.concepts)

    def slot_names(self, target_class: np.ndarray) -> list[list[str]]:
        """The class or concept name of every slot of every image, from ``target_class`` (n, K)."""
        names = np.array([*self.class_names, *(c.name for c in self.concepts)], dtype=object)
        n_classes = target_class.shape[1] - len(self.concepts)
        concept_index = len(self.class_names) + np.arange(len(self.concepts))
        index = np.concatenate(
            [target_class[:, :n_classes], np.broadcast_to(concept_index, (len(target_class), len(self.concepts)))],
            axis=1,
        )
        return names[index].tolist()


@dataclass
class DerivedRows:
    """Derived maps of some rows of the run; rows that could not be derived are listed in ``skipped``."""

    rows: np.ndarray  # (n,) Zarr rows, in the order asked for
    derived: np.ndarray  # (n,) bool: whether the row's maps were derived
    target_class: np.ndarray  # (n, K) int32: class per slot, -1 concept, -2 not derived
    maps: np.ndarray  # (n, K, gh, gw) float32, NaN where not derived
    skipped: dict[int, str]  # row -> why it was not derived


def plan_derive(
    run: Run, targets: str, concepts: Sequence[Concept | str] = (), model: ModelSpec | None = None
) -> DerivePlan:
    """Check that ``run`` can derive ``targets`` and ``concepts``; RunError (one line) when it cannot.

    ``concepts`` are Concept objects or ``NAME=FILE|FOLDER[:cosine]`` arguments; a folder of example images
    is embedded with the run's model (``model``, else as the manifest records it), which nothing else needs.
    """
    if not run.has_basis:
        raise RunError(
            f"{run.url} has no relevance basis: maps can be derived only from a run made with `cdam explain ... --store-basis`"
        )
    try:
        spec = TargetSpec.parse(targets, run.class_names)
    except ValueError as error:
        raise RunError(str(error)) from None
    embed_dim = int(run.group["embedding"].shape[1])
    loaded = []
    for concept in concepts:
        if isinstance(concept, Concept):
            if concept.vector.numel() != embed_dim:
                raise RunError(
                    f"concept {concept.name!r} has {concept.vector.numel()} dims, the run's embedding has {embed_dim}"
                )
            loaded.append(concept)
            continue
        try:
            loaded.append(load_concept(concept, embed_dim, lambda: _embedder(run, model)))
        except ConceptError as error:
            raise RunError(str(error)) from None
    if spec.kind == "none" and not loaded:
        raise RunError("--targets none derives nothing: give classes (e.g. classes:3,zebra, topk:2, all) or --concepts")
    head = run.head
    if spec.kind != "none" and head is None:
        raise RunError(
            f"{run.url} stores no linear head (a run made before heads were stored with the basis): only concepts can be derived; rerun `cdam explain ... --store-basis` to derive classes"
        )
    return DerivePlan(
        spec, tuple(loaded), torch.from_numpy(head[0]) if head is not None else None, tuple(run.class_names)
    )


def derive_rows(run: Run, plan: DerivePlan, rows: np.ndarray, labels: np.ndarray | None = None) -> DerivedRows:
    """The derived maps of ``rows`` (any order); ``labels`` (n,), -1 where absent, for ``label`` targets.

    Rows whose basis or embedding reads NaN (never written) and, for ``label`` targets, rows without a
    label in the model's range are skipped, with the reason.
    """
    rows = np.asarray(rows, dtype=np.int64)
    gh, gw = run.grid
    n, n_slots = len(rows), plan.n_slots
    maps = np.full((n, n_slots, gh, gw), np.nan, dtype=np.float32)
    target_class = np.full((n, n_slots), INT_FILL, dtype=np.int32)
    embedding = run.read_rows("embedding", rows)
    basis = run.read_rows("basis", rows)
    reasons = {
        "its basis or embedding is not written (reads NaN)": np.isnan(basis).reshape(n, -1).any(axis=1)
        | np.isnan(embedding).any(axis=1)
    }
    if plan.spec.kind == "label":
        labels = np.full(n, -1) if labels is None else np.asarray(labels)
        reasons["no cls label (targets 'label')"] = labels < 0
        reasons[f"its label is out of range for the run's {len(plan.class_names)} classes"] = labels >= len(
            plan.class_names
        )
    skipped: dict[int, str] = {}
    derived = np.ones(n, dtype=bool)
    for reason, mask in reasons.items():
        skipped.update(dict.fromkeys(rows[mask & derived].tolist(), reason))
        derived &= ~mask
    good = np.flatnonzero(derived)
    if good.size:
        h = torch.from_numpy(embedding[good]).float()
        classes = plan.spec.resolve(
            torch.from_numpy(run.read_rows("logits", rows[good]))
            if plan.spec.kind == "topk"
            else h.new_zeros(len(good), len(plan.class_names)),
            torch.from_numpy(labels[good]) if plan.spec.kind == "label" else None,
        )
        directions = torch.cat(
            [
                class_directions(plan.head_weight, classes)
                if classes.shape[1]
                else h.new_zeros(len(good), 0, h.shape[1]),
                concept_directions(plan.concepts, h),
            ],
            dim=1,
        )
        good_basis = torch.from_numpy(basis[good]).float().flatten(2)  # (n, D, N)
        maps[good] = maps_from_basis(directions, good_basis.transpose(1, 2)).reshape(len(good), n_slots, gh, gw).numpy()
        target_class[good] = torch.cat([classes, classes.new_full((len(good), len(plan.concepts)), -1)], dim=1).numpy()
    return DerivedRows(rows, derived, target_class, maps, skipped)


def basis_class_maps(run: Run, rows: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """The map of class ``classes[i, k]`` of each row ``rows[i]`` from the basis: (n, K, gh, gw) float32, NaN
    for a negative class or a row whose basis is not written. RunError without a basis and head."""
    head = run.head
    if not run.has_basis or head is None:
        raise RunError(
            f"{run.url} has no relevance basis and head to derive class maps from (a run made with --store-basis has)"
        )
    classes = torch.from_numpy(np.asarray(classes, dtype=np.int64))
    basis = torch.from_numpy(run.read_rows("basis", rows)).float().flatten(2)  # (n, D, N)
    maps = maps_from_basis(class_directions(torch.from_numpy(head[0]), classes.clamp_min(0)), basis.transpose(1, 2))
    maps[classes < 0] = float("nan")
    return maps.reshape(*classes.shape, *run.grid).numpy()


def iter_derived(
    run: Run, plan: DerivePlan, rows: np.ndarray, labels: np.ndarray | None = None, step: int = READ_ROWS
) -> Iterator[DerivedRows]:
    """:func:`derive_rows` a step of rows at a time (the basis of ``step`` images in memory at once)."""
    for start in range(0, len(rows), step):
        yield derive_rows(
            run, plan, rows[start : start + step], None if labels is None else labels[start : start + step]
        )


def derive_maps(
    run: Run, targets: str = "none", keys: Sequence[str] | None = None, concepts: Sequence[Concept | str] = ()
) -> xr.DataArray:
    """CDAM of any classes (``targets``: ``classes:3,zebra``, ``topk:K``, ``label``, ``all``, ``none``) and ``concepts``
    (Concept objects or ``NAME=FILE|FOLDER[:cosine]``) for ``keys``, computed from the run's stored basis without the
    model: a DataArray (image, target, y, x) with ``key``, ``row`` and ``target_class`` coordinates.

    Every image of ``keys`` (default: every explained image of the run's complete shards) has a row; one that
    could not be derived is NaN with target_class -2, and ``attrs["skipped"]`` says why ("key: reason").
    """
    import xarray as xr

    plan = plan_derive(run, targets, concepts)
    index = run.index
    if keys is None:
        keys = index.column("key").to_pylist()
    keys = list(keys)
    rows = run.rows_of(keys)
    labels = _labels_of(run, rows)
    parts = list(iter_derived(run, plan, rows, labels))
    gh, gw = run.grid
    maps = np.concatenate([p.maps for p in parts]) if parts else np.empty((0, plan.n_slots, gh, gw), np.float32)
    target_class = np.concatenate([p.target_class for p in parts]) if parts else np.empty((0, plan.n_slots), np.int32)
    key_of = dict(zip(rows.tolist(), keys))
    skipped = [f"{key_of[row]}: {reason}" for p in parts for row, reason in p.skipped.items()]
    return xr.DataArray(
        maps,
        dims=("image", "target", "y", "x"),
        coords={"key": ("image", keys), "row": ("image", rows), "target_class": (("image", "target"), target_class)},
        name="cdam",
        attrs={"targets": str(plan.spec), "concepts": [c.name for c in plan.concepts], "skipped": skipped},
    )


def _labels_of(run: Run, rows: np.ndarray) -> np.ndarray:
    """The ``cls`` label of each row (-1 where the image has none)."""
    index = run.index
    by_row = dict(zip(index.column("row").to_pylist(), index.column("label").to_pylist()))
    return np.asarray([-1 if by_row.get(row) is None else by_row[row] for row in rows.tolist()], dtype=np.int64)


def _embedder(run: Run, model: ModelSpec | None) -> tuple[CDAMExplainer, object]:
    """The run's model as an explainer and its eval transform, to embed concept examples."""
    loaded = run.load_model(model)
    return CDAMExplainer(loaded), loaded.transform
