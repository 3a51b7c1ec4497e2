"""``cdam evaluate``: the paper's benchmarks (spec section 5) on a seeded sample of a run's images.

Methods (``methods.METHODS``; ``--methods``): the run's CDAM (with Smooth or Integrated CDAM next to vanilla CDAM
when the run used them), the stored attention map (AM: the mean over heads), and, with the model, token
ablation (TAM), input x gradient, attention rollout, the gradient-weighted attention and the relevance
propagation of Chefer et al., Integrated Gradients and SmoothGrad. For each sampled image and method:

- compactness and Gini index of the map of the predicted class;
- correctness: Spearman correlation of that map with TAM's, and the token-deletion curves of the predicted
  class's logit (the most relevant tokens removed first, and the least relevant first) with the area
  between them, and the areas under the deletion and insertion (most relevant first) curves in logits and
  in probability;
- class sensitivity: cosine and Spearman similarity between the maps of the predicted class and of the
  runner-up class (the second of ``topk_classes``); the attention map is the same for every class, so its
  similarity is 1 by construction.

Maps come from the run where it holds them (a stored target slot, else the basis), else from the engine.
Without the model only stored maps are measured; what needs the model is NaN, and a note says so. With the
model, ``sanity`` (model and label randomisation) and ``robustness`` (max-sensitivity, FGSM) run on the first
images of the sample. Every summary value comes with the number of images it is over and a 95% percentile
bootstrap interval of the mean (``BOOTSTRAP_RESAMPLES`` resamples of the images, seeded).
"""

from __future__ import annotations

import io
import json
import sys
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from cdam_worker.shards.specs import DataError
from cdam_worker.derive import basis_class_maps
from cdam_worker.maps.engine import CDAMExplainer, VariantConfig
from cdam_worker.evaluate import metrics
from cdam_worker.evaluate.attention import UnsupportedModel, check_supported
from cdam_worker.evaluate.methods import BY_NAME, MapOptions, ModelMaps, parse_methods
from cdam_worker.evaluate.perturb import check_device, deletion_curves, rows_per_pass
from cdam_worker.evaluate.robustness import robustness_checks
from cdam_worker.evaluate.sanity import sanity_checks
from cdam_worker.maps.model import LoadedModel
from cdam_worker.reading.cluster import run_units
from cdam_worker.reading.run import Run, RunError
from cdam_worker.storage import StorageError
from schemas.evaluation import CHECKS, IMAGES_SCHEMA, MEASURES, SUMMARY_SCHEMA

CDAM_NAMES = {"vanilla": "CDAM", "smooth": "Smooth CDAM", "integrated": "Integrated CDAM"}
AM, TAM = "AM", "TAM"
STORED = ("CDAM", "Smooth CDAM", "Integrated CDAM", AM)  # read from the run where it holds them
BOOTSTRAP_RESAMPLES = 1000
LOGIT_TOLERANCE = 1e-3  # relative; beyond it the model (or the image decoding) does not reproduce the run


@dataclass(frozen=True)
class EvaluateSettings:
    """How many images (a seeded sample), which methods, how many deletion steps, how big the batches are, where
    the model runs, and the sanity and robustness checks' sizes."""

    sample: int = 1000
    seed: int = 0
    steps: int = 10
    batch: int = 16  # images per step
    device: str = "cpu"  # where the model runs: "cpu" or "cuda[:N]"
    methods: str = "cheap"  # --methods
    ig_steps: int = 16
    smoothgrad_samples: int = 16
    sanity: int = 16  # images of the sanity checks (the sample's first), 0: none
    robustness: int = 16  # images of the robustness checks, 0: none
    perturbations: int = 8  # max-sensitivity's random perturbations per image
    radius: float = 0.02  # their size: uniform in +-radius x the image's value range
    fgsm_eps: float = 0.01  # the FGSM step, x the image's value range

    def __post_init__(self) -> None:
        if min(self.sample, self.steps, self.batch) < 1:
            raise RunError(
                f"--sample, --steps and --batch-size must be at least 1 (got {self.sample}, {self.steps}, {self.batch})"
            )
        if min(self.ig_steps, self.smoothgrad_samples, self.perturbations) < 1 or min(self.sanity, self.robustness) < 0:
            raise RunError(
                "--ig-steps, --smoothgrad-samples and --perturbations must be at least 1, --sanity and --robustness at least 0"
            )
        if not (self.radius > 0 and self.fgsm_eps > 0):
            raise RunError(f"--radius and --fgsm-eps must be positive (got {self.radius}, {self.fgsm_eps})")
        try:
            parse_methods(self.methods)
        except ValueError as error:
            raise RunError(str(error)) from None
        check_device(self.device)


@dataclass
class Evaluation:
    images: pa.Table  # one row per (image, method), IMAGES_SCHEMA
    summary: pa.Table  # one row per method, SUMMARY_SCHEMA
    notes: list[str] = field(default_factory=list)  # what was skipped or not measured, and why
    sanity: pa.Table | None = None  # one row per method and randomisation, sanity.SANITY_SCHEMA (None: not run)


def methods_of(run: Run, with_model: bool, selected: str = "cheap") -> list[str]:
    """The methods evaluated, in the paper's order (CDAM first): those of ``selected`` (``--methods``) that can be
    measured (without the model, only the stored maps)."""
    names = parse_methods(selected)
    variant = run.attrs.get("variant", {}).get("variant", "vanilla")
    cdam = []
    if "CDAM" in names:
        cdam = (
            [CDAM_NAMES["vanilla"]] if variant == "vanilla" or with_model else []
        )  # vanilla CDAM of a Smooth run: the engine
        if variant != "vanilla":
            cdam.append(CDAM_NAMES[variant])
    return cdam + [name for name in names if name != "CDAM" and (with_model or name == AM)]


def evaluate_run(
    run: Run,
    model: LoadedModel | None,
    settings: EvaluateSettings = EvaluateSettings(),
    address: str | None = None,
) -> Evaluation:
    """Measure every method on a seeded sample of the run's images (``model`` None: stored maps only): the
    sample's batches here, or one Ray task per shard's batches on the cluster at ``address`` (or RAY_ADDRESS),
    the same batches either way; the sanity and robustness checks run here."""
    notes = list(run.skipped)
    if model is None:
        notes.append(
            "measured without the model: the stored maps' (CDAM, AM) compactness, Gini and class sensitivity; skipped: the model-side methods "
            "(TAM, input x gradient, rollout, the attention-gradient methods, IG, SmoothGrad), correctness, the deletion and insertion curves, "
            "the sanity and robustness checks"
        )
    rows, keys, classes = _sample(run, settings)
    methods = methods_of(run, model is not None, settings.methods)
    chunk_evaluator = _ChunkEvaluator(run, model, settings, methods, notes)
    methods = chunk_evaluator.methods  # less any the model does not support
    columns: dict[str, list] = {f.name: [] for f in IMAGES_SCHEMA}
    units = _shard_batches(run, rows, keys, classes, settings.batch)
    with tqdm(total=len(rows), desc="evaluating", unit="img", file=sys.stderr, disable=len(rows) == 0) as bar:

        def done(result: tuple[dict[str, list], list[str], int]) -> None:
            bar.update(result[2])

        for unit_columns, unit_notes, _ in run_units(
            _evaluate_unit, units, run, (model, settings, methods, torch.get_num_threads()), address=address, done=done
        ):
            for name, values in unit_columns.items():
                columns[name] += values
            notes += unit_notes
    images = pa.table(columns, schema=IMAGES_SCHEMA)
    checks: dict[str, dict[str, np.ndarray]] = {method: {} for method in methods}
    sanity = None
    if chunk_evaluator.maps is not None:
        model_side = [m for m in methods if m in BY_NAME]
        if len(model_side) < len(methods) and (settings.sanity or settings.robustness):
            notes.append(
                f"{', '.join(m for m in methods if m not in BY_NAME)}: not in the sanity and robustness checks (vanilla CDAM is)"
            )
        if settings.sanity and model_side:
            head_rows = slice(0, settings.sanity)
            sanity, per_image = sanity_checks(
                run,
                model,
                chunk_evaluator,
                model_side,
                rows[head_rows],
                keys[head_rows],
                classes[head_rows, :1],
                settings,
                notes,
            )
            for method, values in per_image.items():
                checks[method].update(values)
        if settings.robustness and model_side:
            head_rows = slice(0, settings.robustness)
            for method, values in robustness_checks(
                chunk_evaluator, model_side, rows[head_rows], keys[head_rows], classes[head_rows, :1], settings, notes
            ).items():
                checks[method].update(values)
    return Evaluation(images, _summary(images, methods, checks, settings.seed), notes, sanity)


def write_evaluation(run: Run, evaluation: Evaluation, settings: EvaluateSettings) -> None:
    """Write ``evaluation/images.parquet``, ``summary.parquet`` (and ``sanity.parquet`` when the sanity checks ran)
    into the run, the settings in their schema metadata (``cdam.evaluation``). Call it holding
    ``run.exclusive("evaluate")``: one writer per file."""
    described = {
        b"cdam.evaluation": json.dumps(
            {**asdict(settings), "run_fingerprint": run.attrs.get("run_fingerprint")}
        ).encode()
    }
    tables = [("images", evaluation.images), ("summary", evaluation.summary)] + (
        [("sanity", evaluation.sanity)] if evaluation.sanity is not None else []
    )
    for name, table in tables:
        sink = io.BytesIO()
        pq.write_table(
            table.replace_schema_metadata({**(table.schema.metadata or {}), **described}), sink, compression="zstd"
        )
        run.storage.put(f"evaluation/{name}.parquet", sink.getvalue())


SHOWN = (
    ("compactness", "compactness"),
    ("gini", "Gini"),
    ("correctness_spearman", "Spearman with TAM"),
    ("deletion_auc_gap", "deletion gap (logit)"),
    ("deletion_auc", "deletion area (logit)"),
    ("insertion_auc", "insertion area (logit)"),
    ("deletion_auc_prob", "deletion area (prob.)"),
    ("insertion_auc_prob", "insertion area (prob.)"),
    ("class_similarity", "class sim. cos"),
    ("class_similarity_spearman", "class sim. Spearman"),
    ("sanity_spearman_head", "random head: Spearman"),
    ("sanity_ssim_head", "random head: SSIM"),
    ("sanity_spearman_last_block", "random last block: Spearman"),
    ("sanity_ssim_last_block", "random last block: SSIM"),
    ("sanity_spearman_cascade", "random all (cascade): Spearman"),
    ("sanity_ssim_cascade", "random all (cascade): SSIM"),
    ("sanity_spearman_labels", "random labels: Spearman"),
    ("sanity_ssim_labels", "random labels: SSIM"),
    ("max_sensitivity", "max-sensitivity"),
    ("fgsm_change", "FGSM: map change"),
    ("fgsm_spearman", "FGSM: Spearman"),
)
"""The measures as printed, in order: (column, label)."""


def format_summary(summary: pa.Table) -> str:
    """The summary as a text table: per measure, one line per method with its mean, 95% interval and number of
    images (a method a measure does not apply to, or that was not measured, is left out of that measure)."""
    width = max([len(label) for _, label in SHOWN] + [7])
    names = max([len(m) for m in summary.column("method").to_pylist()] + [6])
    header = f"{'measure':<{width}}  {'method':<{names}}  {'mean':>8}  {'95% interval':>18}  {'images':>6}"
    lines = [header, "-" * len(header)]
    rows = summary.to_pylist()
    for column, label in SHOWN:
        shown = [row for row in rows if row[column] is not None and not np.isnan(row[column])]
        for position, row in enumerate(shown):
            low, high = row[f"{column}_low"], row[f"{column}_high"]
            interval = "" if low is None or np.isnan(low) else f"[{low:.3f}, {high:.3f}]"
            lines.append(
                f"{label if position == 0 else '':<{width}}  {row['method']:<{names}}  {row[column]:>8.3f}  {interval:>18}  {row[f'{column}_n']:>6}"
            )
    return "\n".join(lines)


# -- the sample ----------------------------------------------------------------------------------


def _sample(run: Run, settings: EvaluateSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows and keys of a seeded sample (sorted by row), with each image's (predicted, runner-up) classes."""
    table = run.metadata.to_table(columns=["key", "row", "pred", "topk_classes"]).sort_by("row")
    if table.num_rows == 0:
        raise RunError(
            f"{run.url} has no explained image to evaluate" + (f" ({run.skipped[0]})" if run.skipped else "")
        )
    chosen = np.sort(
        np.random.default_rng(settings.seed).choice(
            table.num_rows, size=min(settings.sample, table.num_rows), replace=False
        )
    )
    table = table.take(chosen)
    runner_up = [top[1] if len(top) > 1 else -1 for top in table.column("topk_classes").to_pylist()]
    classes = np.stack([table.column("pred").to_numpy(), np.asarray(runner_up)], axis=1).astype(np.int64)
    return table.column("row").to_numpy(), np.asarray(table.column("key").to_pylist(), dtype=object), classes


# -- the units of work: a shard's batches of the sample ---------------------------------------------


def _shard_batches(
    run: Run, rows: np.ndarray, keys: np.ndarray, classes: np.ndarray, batch: int
) -> list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """The sample's batches (``batch`` images each, in row order, as always), grouped by the shard of their
    first row: one unit of work per shard."""
    rows_per_shard = int(run.attrs["rows_per_shard"])
    units: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = []
    shard_of_unit = None
    for start in range(0, len(rows), batch):
        part = slice(start, start + batch)
        if rows[start] // rows_per_shard != shard_of_unit:
            units.append([])
            shard_of_unit = rows[start] // rows_per_shard
        units[-1].append((rows[part], keys[part], classes[part]))
    return units


def _evaluate_unit(
    batches: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    run: Run,
    shared: tuple[LoadedModel | None, EvaluateSettings, list[str], int],
) -> tuple[dict[str, list], list[str], int]:
    """One shard's batches (here or as a Ray task): their columns of the images table, their notes and the number
    of images. It computes with the driver's number of torch threads (a Ray task gets one by default): the model's
    sums are split by thread, so their last bits, and the tables' bytes, depend on it."""
    model, settings, methods, threads = shared
    own_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _evaluate_batches(batches, run, model, settings, methods)
    finally:
        torch.set_num_threads(own_threads)


def _evaluate_batches(
    batches: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    run: Run,
    model: LoadedModel | None,
    settings: EvaluateSettings,
    methods: list[str],
) -> tuple[dict[str, list], list[str], int]:
    notes: list[str] = []
    evaluator = _ChunkEvaluator(run, model, settings, methods, notes)
    del notes[:]  # what the evaluator says of the model the driver's evaluator has said already
    columns: dict[str, list] = {f.name: [] for f in IMAGES_SCHEMA}
    for rows, keys, classes in batches:
        for name, values in evaluator(rows, keys, classes).items():
            columns[name] += values
    return columns, notes, sum(len(rows) for rows, _, _ in batches)


# -- one chunk of images ---------------------------------------------------------------------------


class _ChunkEvaluator:
    """Maps of every method for a chunk of images, and their measures as columns of the images table."""

    def __init__(
        self, run: Run, model: LoadedModel | None, settings: EvaluateSettings, methods: list[str], notes: list[str]
    ) -> None:
        self.run, self.model, self.settings, self.notes = run, model, settings, notes
        self.variant = run.attrs.get("variant", {}).get("variant", "vanilla")
        self.own = CDAM_NAMES[self.variant]
        self.device = torch.device(settings.device)
        self.explainer = (
            CDAMExplainer(model.model.to(self.device), class_names=model.class_names) if model is not None else None
        )
        self.options = MapOptions(
            tuple(run.attrs["patch_size"]),
            tuple(run.grid),
            settings.ig_steps,
            settings.smoothgrad_samples,
            seed=settings.seed,
        )
        self.maps = ModelMaps(model.model, self.options, self.device) if model is not None else None
        self.methods = self._supported(methods)
        n_patches = run.grid[0] * run.grid[1]
        prefix = int(run.attrs.get("num_prefix_tokens", 1))
        self.removed = metrics.deletion_steps(
            n_patches if prefix else n_patches - 1, settings.steps
        )  # a model without prefix tokens keeps one
        self.logits_checked = False

    def _supported(self, methods: list[str]) -> list[str]:
        """``methods`` less those the model cannot be explained by (a note says why)."""
        if self.maps is None:
            return methods
        try:
            check_supported(self.model.model)
        except UnsupportedModel as error:
            dropped = [
                m for m in methods if m in ("Attention rollout", "Gradient-weighted attention", "Relevance propagation")
            ]
            if dropped:
                self.notes.append(f"{', '.join(dropped)}: not measured ({error})")
            return [m for m in methods if m not in dropped]
        return methods

    def __call__(self, rows: np.ndarray, keys: np.ndarray, classes: np.ndarray) -> dict[str, list]:
        written = ~np.isnan(self.run.read_rows("embedding", rows)).any(axis=1)
        for row, key in zip(rows[~written].tolist(), keys[~written].tolist()):
            self.notes.append(f"image {key} (row {row}): its arrays read NaN (not written): not evaluated")
        rows, keys, classes = rows[written], keys[written], classes[written]
        maps = self._stored_maps(rows, classes)
        curves = {
            method: np.full((len(rows), 3, len(self.removed)), np.nan, dtype=np.float32) for method in self.methods
        }
        probabilities = {
            method: np.full((len(rows), 2, len(self.removed)), np.nan, dtype=np.float32) for method in self.methods
        }
        if self.model is not None:
            images, usable = self.images(keys)
            if usable.any():
                self._model_maps(images, rows[usable], keys[usable], classes[usable], usable, maps)
                self._curves(images, classes[usable], usable, maps, curves, probabilities)
        return self._columns(rows, keys, classes, maps, curves, probabilities)

    def _stored_maps(self, rows: np.ndarray, classes: np.ndarray) -> dict[str, np.ndarray]:
        """The run's CDAM of both classes (stored slot, else the basis) and its attention map, flattened (n, 2, N)."""
        run = self.run
        n = len(rows)
        maps = {method: np.full((n, 2, run.grid[0] * run.grid[1]), np.nan, dtype=np.float32) for method in self.methods}
        if self.own in maps:
            cdam = run.class_maps(rows, classes)
            if np.isnan(cdam[classes >= 0]).any() and run.has_basis and run.head is not None:
                cdam = np.where(np.isnan(cdam), basis_class_maps(run, rows, classes), cdam)
            maps[self.own] = cdam.reshape(n, 2, -1)
        if AM in maps:
            attention = run.read_rows("attention", rows).astype(np.float32).mean(axis=1)  # AM: the mean over heads
            maps[AM] = np.repeat(attention.reshape(n, 1, -1), 2, axis=1)
        return maps

    def images(self, keys: np.ndarray) -> tuple[torch.Tensor | None, np.ndarray]:
        """The model's inputs of the images that can be read, and which those are."""
        usable = np.zeros(len(keys), dtype=bool)
        tensors = []
        for position, key in enumerate(keys.tolist()):
            try:
                tensors.append(self.model.transform(self.run.image(key)))
                usable[position] = True
            except (RunError, DataError, StorageError, OSError) as error:  # a moved shard, an unreadable member
                self.notes.append(f"image {key}: cannot be read ({error}): only its stored maps are measured")
        return (torch.stack(tensors).to(self.device) if tensors else None), usable

    def _model_maps(
        self,
        images: torch.Tensor,
        rows: np.ndarray,
        keys: np.ndarray,
        classes: np.ndarray,
        usable: np.ndarray,
        maps: dict[str, np.ndarray],
    ) -> None:
        """The model-side methods' maps, and the CDAM the run does not hold (by the engine), into ``maps`` at ``usable``."""
        n = len(rows)
        both = torch.from_numpy(np.where(classes < 0, classes[:, :1], classes)).to(
            self.device
        )  # a missing runner-up: any valid class, NaN below
        with torch.no_grad():
            self._check_logits(rows, self.model.model(images).cpu())
        computed = {}
        for method in self.methods:
            if method in BY_NAME and method not in STORED:
                computed[method] = self.maps(method, images, both, rows.tolist()).cpu().numpy()
        if CDAM_NAMES["vanilla"] in self.methods and self.variant != "vanilla":
            computed[CDAM_NAMES["vanilla"]] = self.explainer.explain(images, both).cdam.reshape(n, 2, -1).cpu().numpy()
        if self.own in self.methods:
            own = maps[self.own][usable]
            if np.isnan(
                own[classes >= 0]
            ).any():  # neither stored nor derivable from a basis: the engine, with the run's variant
                variant = VariantConfig(
                    self.variant, **{k: v for k, v in self.run.attrs.get("variant", {}).items() if k != "variant"}
                )
                engine = (
                    self.explainer.explain(images, both, keys=list(keys), variant=variant)
                    .cdam.reshape(n, 2, -1)
                    .cpu()
                    .numpy()
                )
                computed[self.own] = np.where(np.isnan(own), engine, own)
        for method, values in computed.items():
            values[classes < 0] = np.nan
            maps[method][usable] = values

    def _curves(
        self,
        images: torch.Tensor,
        classes: np.ndarray,
        usable: np.ndarray,
        maps: dict[str, np.ndarray],
        curves: dict[str, np.ndarray],
        probabilities: dict[str, np.ndarray],
    ) -> None:
        """Every method's deletion and insertion curves of the predicted class, in one batch per step, into
        ``curves`` ((drops most first, drops least first, insertion logits), per step) and ``probabilities``
        (deletion, insertion) at ``usable``. Inserting the k most relevant tokens keeps what removing all but
        them keeps: the insertion curve is the least-relevant-first deletion read backwards."""
        pred_maps = np.stack([maps[method][usable, 0] for method in self.methods], axis=1)  # (u, M, N)
        orders = metrics.deletion_orders(
            np.nan_to_num(pred_maps.reshape(-1, pred_maps.shape[2]), nan=0.0)
        )  # (u * M, 2, N)
        as_tensor = lambda values: torch.from_numpy(values).to(self.device)
        logits, probs = deletion_curves(
            self.model.model,
            images,
            as_tensor(classes[:, 0]),
            as_tensor(orders).view(len(pred_maps), -1, orders.shape[2]),
            as_tensor(self.removed),
            self._rows(images),
        )
        logits = logits.view(len(pred_maps), len(self.methods), 2, -1).cpu().numpy()
        probs = probs.view(len(pred_maps), len(self.methods), 2, -1).cpu().numpy()
        for position, method in enumerate(self.methods):
            has_map = ~np.isnan(pred_maps[:, position]).any(axis=1)
            mine = logits[has_map, position]
            drops = mine[:, :, :1] - mine
            at = np.flatnonzero(usable)[has_map]
            curves[method][at] = np.concatenate([drops, mine[:, 1:, ::-1]], axis=1)
            probabilities[method][at] = np.stack(
                [probs[has_map, position, 0], probs[has_map, position, 1, ::-1]], axis=1
            )

    def _rows(self, images: torch.Tensor) -> int:
        """Sequences per forward pass for these images' token count."""
        n_tokens = self.run.grid[0] * self.run.grid[1] + self.model.model.num_prefix_tokens
        return rows_per_pass(self.model.model, n_tokens, self.device)

    def _check_logits(self, rows: np.ndarray, logits: torch.Tensor) -> None:
        """Note once when the model's logits on the images are not the stored ones (another model, or decoding)."""
        if self.logits_checked:
            return
        self.logits_checked = True
        stored = self.run.read_rows("logits", rows)
        error = float(np.abs(logits.numpy() - stored).max() / max(np.abs(stored).max(), 1e-12))
        if error > LOGIT_TOLERANCE:
            self.notes.append(
                f"the model's logits on the images differ from the run's by {error:.1e} (relative): TAM, deletion and input x gradient describe a slightly different computation"
            )

    def _columns(
        self,
        rows: np.ndarray,
        keys: np.ndarray,
        classes: np.ndarray,
        maps: dict[str, np.ndarray],
        curves: dict[str, np.ndarray],
        probabilities: dict[str, np.ndarray],
    ) -> dict[str, list]:
        """The images table's columns: one row per image and method."""
        columns: dict[str, list] = {f.name: [] for f in IMAGES_SCHEMA}
        tam = maps.get(TAM)
        area = lambda values: metrics.curve_area(
            values, self.removed
        )  # over the share removed (or inserted): the same grid read backwards
        as_lists = lambda values: [None if np.isnan(c).any() else c.tolist() for c in values]
        for method in self.methods:
            pred, other = maps[method][:, 0], maps[method][:, 1]
            measured = {
                "compactness": metrics.compactness(pred),
                "gini": metrics.gini(pred),
                "correctness_spearman": metrics.spearman(pred, tam[:, 0])
                if tam is not None
                else np.full(len(rows), np.nan),
                "deletion_auc_gap": metrics.deletion_gap(curves[method][:, :2], self.removed),
                "class_similarity": metrics.cosine(pred, other),
                "class_similarity_spearman": metrics.spearman(pred, other),
                "deletion_auc": area(
                    curves[method][:, 2, -1:] - curves[method][:, 0]
                ),  # the full image's logit (all inserted) less the drops
                "insertion_auc": area(curves[method][:, 2]),
                "deletion_auc_prob": area(probabilities[method][:, 0]),
                "insertion_auc_prob": area(probabilities[method][:, 1]),
            }
            columns["key"] += keys.tolist()
            columns["row"] += rows.tolist()
            columns["method"] += [method] * len(rows)
            columns["class"] += classes[:, 0].tolist()
            columns["other_class"] += classes[:, 1].tolist()
            for name, values in measured.items():
                columns[name] += values.tolist()
            columns["deletion_most_first"] += as_lists(curves[method][:, 0])
            columns["deletion_least_first"] += as_lists(curves[method][:, 1])
            columns["insertion_most_first"] += as_lists(curves[method][:, 2])
            columns["deletion_prob_most_first"] += as_lists(probabilities[method][:, 0])
            columns["insertion_prob_most_first"] += as_lists(probabilities[method][:, 1])
        return columns


def _summary(images: pa.Table, methods: list[str], checks: dict[str, dict[str, np.ndarray]], seed: int) -> pa.Table:
    """Per method: every measure's mean over the images that have it, its bootstrap interval and image count
    (``checks``: per method, the sanity and robustness measures' per-image values), and how many images have a map."""
    method_of = np.asarray(images.column("method").to_pylist(), dtype=object)
    rows = []
    for method in methods:
        mine = method_of == method
        values = {
            name: images.column(name).to_numpy(zero_copy_only=False)[mine].astype(np.float64) for name in MEASURES
        }
        values.update({name: np.asarray(checks.get(method, {}).get(name, []), dtype=np.float64) for name in CHECKS})
        row = {"method": method, "n_images": int(np.isfinite(values["compactness"]).sum())}
        for name, v in values.items():
            finite = v[np.isfinite(v)]
            row[name] = float(finite.mean()) if len(finite) else float("nan")
            row[f"{name}_low"], row[f"{name}_high"] = metrics.bootstrap_interval(finite, BOOTSTRAP_RESAMPLES, seed)
            row[f"{name}_n"] = len(finite)
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA)
