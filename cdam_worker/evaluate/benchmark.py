"""``cdam evaluate``: the paper's benchmarks (spec section 5) on a seeded sample of a run's images.

Methods: the run's CDAM (with Smooth or Integrated CDAM next to vanilla CDAM when the run used them), the
stored attention map (AM: the mean over heads), and, with the model, token ablation (TAM) and input x
gradient. For each sampled image and method:

- compactness and Gini index of the map of the predicted class;
- correctness: Spearman correlation of that map with TAM's, and the token-deletion curves of the predicted
  class's logit (the most relevant tokens removed first, and the least relevant first) with the area
  between them;
- class sensitivity: cosine and Spearman similarity between the maps of the predicted class and of the
  runner-up class (the second of ``topk_classes``); the attention map is the same for every class, so its
  similarity is 1 by construction.

Maps come from the run where it holds them (a stored target slot, else the basis), else from the engine.
Without the model only stored maps are measured; what needs the model is NaN, and a note says so.
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
from cdam_worker.evaluate.perturb import deletion_drops, input_x_gradient, rows_per_pass, token_ablation
from cdam_worker.maps.model import LoadedModel
from cdam_worker.reading.run import Run, RunError
from cdam_worker.storage import StorageError

CDAM_NAMES = {"vanilla": "CDAM", "smooth": "Smooth CDAM", "integrated": "Integrated CDAM"}
AM, TAM, INPUT_X_GRADIENT = "AM", "TAM", "Input x gradient"
MEASURES = ("compactness", "gini", "correctness_spearman", "deletion_auc_gap", "class_similarity", "class_similarity_spearman")
LOGIT_TOLERANCE = 1e-3  # relative; beyond it the model (or the image decoding) does not reproduce the run

IMAGES_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("row", pa.int64(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        pa.field("class", pa.int32(), nullable=False, metadata={"doc": "the predicted class, whose map is measured"}),
        pa.field("other_class", pa.int32(), nullable=False, metadata={"doc": "the runner-up class (class sensitivity), -1 if none"}),
        *(pa.field(name, pa.float64()) for name in MEASURES),
        pa.field("deletion_most_first", pa.list_(pa.float32()), metadata={"doc": "logit drop with the most relevant tokens removed first, per step"}),
        pa.field("deletion_least_first", pa.list_(pa.float32()), metadata={"doc": "the same, least relevant first"}),
    ],
    metadata={"schema": "cdam.evaluation-images/1"},
)
SUMMARY_SCHEMA = pa.schema(
    [pa.field("method", pa.string(), nullable=False), *(pa.field(name, pa.float64()) for name in MEASURES), pa.field("n_images", pa.int64(), nullable=False)],
    metadata={"schema": "cdam.evaluation-summary/1"},
)


@dataclass(frozen=True)
class EvaluateSettings:
    """How many images (a seeded sample), how many deletion steps, how big the batches are, and where the
    model runs."""

    sample: int = 1000
    seed: int = 0
    steps: int = 10
    batch: int = 16  # images per step
    device: str = "cpu"  # where the model runs: "cpu" or "cuda[:N]"

    def __post_init__(self) -> None:
        if min(self.sample, self.steps, self.batch) < 1:
            raise RunError(f"--sample, --steps and --batch-size must be at least 1 (got {self.sample}, {self.steps}, {self.batch})")
        try:
            device = torch.device(self.device)
        except RuntimeError as error:
            raise RunError(f"--device {self.device!r}: {error}") from None
        if device.type not in ("cpu", "cuda") or (device.type == "cuda" and not torch.cuda.is_available()):
            raise RunError(f"--device {self.device!r}: use cpu, or cuda where torch.cuda.is_available() (it is {torch.cuda.is_available()} here)")


@dataclass
class Evaluation:
    images: pa.Table  # one row per (image, method), IMAGES_SCHEMA
    summary: pa.Table  # one row per method, SUMMARY_SCHEMA
    notes: list[str] = field(default_factory=list)  # what was skipped or not measured, and why


def methods_of(run: Run, with_model: bool) -> list[str]:
    """The methods evaluated, in the paper's order (CDAM first)."""
    variant = run.attrs.get("variant", {}).get("variant", "vanilla")
    cdam = [CDAM_NAMES["vanilla"]] if variant == "vanilla" or with_model else []  # vanilla CDAM of a Smooth run: the engine
    if variant != "vanilla":
        cdam.append(CDAM_NAMES[variant])
    return cdam + ([TAM] if with_model else []) + [AM] + ([INPUT_X_GRADIENT] if with_model else [])


def evaluate_run(run: Run, model: LoadedModel | None, settings: EvaluateSettings = EvaluateSettings()) -> Evaluation:
    """Measure every method on a seeded sample of the run's images (``model`` None: stored maps only)."""
    notes = list(run.skipped)
    if model is None:
        notes.append("no model: TAM, input x gradient, correctness and deletion curves are not measured (give the model flags, or keep the run's checkpoint where its manifest says)")
    rows, keys, classes = _sample(run, settings)
    methods = methods_of(run, model is not None)
    chunk_evaluator = _ChunkEvaluator(run, model, settings, methods, notes)
    columns: dict[str, list] = {f.name: [] for f in IMAGES_SCHEMA}
    with tqdm(total=len(rows), desc="evaluating", unit="img", file=sys.stderr, disable=len(rows) == 0) as bar:
        for start in range(0, len(rows), settings.batch):
            part = slice(start, start + settings.batch)
            for name, values in chunk_evaluator(rows[part], keys[part], classes[part]).items():
                columns[name] += values
            bar.update(len(rows[part]))
    images = pa.table(columns, schema=IMAGES_SCHEMA)
    return Evaluation(images, _summary(images, methods), notes)


def write_evaluation(run: Run, evaluation: Evaluation, settings: EvaluateSettings) -> None:
    """Write ``evaluation/images.parquet`` and ``evaluation/summary.parquet`` into the run, the settings in their
    schema metadata (``cdam.evaluation``). Call it holding ``run.exclusive("evaluate")``: one writer per file."""
    described = {b"cdam.evaluation": json.dumps({**asdict(settings), "run_fingerprint": run.attrs.get("run_fingerprint")}).encode()}
    for name, table in (("images", evaluation.images), ("summary", evaluation.summary)):
        sink = io.BytesIO()
        pq.write_table(table.replace_schema_metadata({**(table.schema.metadata or {}), **described}), sink, compression="zstd")
        run.storage.put(f"evaluation/{name}.parquet", sink.getvalue())


def format_summary(summary: pa.Table) -> str:
    """The summary as a text table, one line per method (like the paper's)."""
    header = f"{'method':<18} {'compactness':>11} {'gini':>6} {'Spearman/TAM':>12} {'deletion gap':>12} {'class sim. cos':>14} {'class sim. rho':>14} {'images':>7}"
    lines = [header, "-" * len(header)]
    for row in summary.to_pylist():
        values = [row[m] for m in MEASURES]
        shown = ["-" if v is None or np.isnan(v) else f"{v:.3f}" for v in values]
        lines.append(f"{row['method']:<18} {shown[0]:>11} {shown[1]:>6} {shown[2]:>12} {shown[3]:>12} {shown[4]:>14} {shown[5]:>14} {row['n_images']:>7}")
    return "\n".join(lines)


# -- the sample ----------------------------------------------------------------------------------


def _sample(run: Run, settings: EvaluateSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows and keys of a seeded sample (sorted by row), with each image's (predicted, runner-up) classes."""
    table = run.metadata.to_table(columns=["key", "row", "pred", "topk_classes"]).sort_by("row")
    if table.num_rows == 0:
        raise RunError(f"{run.url} has no explained image to evaluate" + (f" ({run.skipped[0]})" if run.skipped else ""))
    chosen = np.sort(np.random.default_rng(settings.seed).choice(table.num_rows, size=min(settings.sample, table.num_rows), replace=False))
    table = table.take(chosen)
    runner_up = [top[1] if len(top) > 1 else -1 for top in table.column("topk_classes").to_pylist()]
    classes = np.stack([table.column("pred").to_numpy(), np.asarray(runner_up)], axis=1).astype(np.int64)
    return table.column("row").to_numpy(), np.asarray(table.column("key").to_pylist(), dtype=object), classes


# -- one chunk of images ---------------------------------------------------------------------------


class _ChunkEvaluator:
    """Maps of every method for a chunk of images, and their measures as columns of the images table."""

    def __init__(self, run: Run, model: LoadedModel | None, settings: EvaluateSettings, methods: list[str], notes: list[str]) -> None:
        self.run, self.model, self.settings, self.methods, self.notes = run, model, settings, methods, notes
        self.variant = run.attrs.get("variant", {}).get("variant", "vanilla")
        self.own = CDAM_NAMES[self.variant]
        self.device = torch.device(settings.device)
        self.explainer = CDAMExplainer(model.model.to(self.device), class_names=model.class_names) if model is not None else None
        n_patches = run.grid[0] * run.grid[1]
        prefix = int(run.attrs.get("num_prefix_tokens", 1))
        self.removed = metrics.deletion_steps(n_patches if prefix else n_patches - 1, settings.steps)  # a model without prefix tokens keeps one
        self.logits_checked = False

    def __call__(self, rows: np.ndarray, keys: np.ndarray, classes: np.ndarray) -> dict[str, list]:
        written = ~np.isnan(self.run.read_rows("embedding", rows)).any(axis=1)
        for row, key in zip(rows[~written].tolist(), keys[~written].tolist()):
            self.notes.append(f"image {key} (row {row}): its arrays read NaN (not written): not evaluated")
        rows, keys, classes = rows[written], keys[written], classes[written]
        maps = self._stored_maps(rows, classes)
        drops = {method: np.full((len(rows), 2, len(self.removed)), np.nan, dtype=np.float32) for method in self.methods}
        if self.model is not None:
            images, usable = self._images(keys)
            if usable.any():
                self._model_maps(images, rows[usable], keys[usable], classes[usable], usable, maps)
                self._deletion(images, classes[usable], usable, maps, drops)
        return self._columns(rows, keys, classes, maps, drops)

    def _stored_maps(self, rows: np.ndarray, classes: np.ndarray) -> dict[str, np.ndarray]:
        """The run's CDAM of both classes (stored slot, else the basis) and its attention map, flattened (n, 2, N)."""
        run = self.run
        n = len(rows)
        cdam = run.class_maps(rows, classes)
        if np.isnan(cdam[classes >= 0]).any() and run.has_basis and run.head is not None:
            cdam = np.where(np.isnan(cdam), basis_class_maps(run, rows, classes), cdam)
        attention = run.read_rows("attention", rows).astype(np.float32).mean(axis=1)  # AM: the mean over heads
        maps = {method: np.full((n, 2, run.grid[0] * run.grid[1]), np.nan, dtype=np.float32) for method in self.methods}
        maps[self.own] = cdam.reshape(n, 2, -1)
        maps[AM] = np.repeat(attention.reshape(n, 1, -1), 2, axis=1)
        return maps

    def _images(self, keys: np.ndarray) -> tuple[torch.Tensor | None, np.ndarray]:
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

    def _model_maps(self, images: torch.Tensor, rows: np.ndarray, keys: np.ndarray, classes: np.ndarray, usable: np.ndarray, maps: dict[str, np.ndarray]) -> None:
        """TAM, input x gradient, and the CDAM the run does not hold (by the engine), into ``maps`` at ``usable``."""
        model, n = self.model.model, len(rows)
        both = torch.from_numpy(np.where(classes < 0, classes[:, :1], classes)).to(self.device)  # a missing runner-up: any valid class, NaN below
        logits, ablation = token_ablation(model, images, self._rows(images))
        self._check_logits(rows, logits.cpu())
        rows_with_grad = max(1, self._rows(images) // (3 * len(model.blocks)))  # backward keeps every block's activations
        computed = {
            TAM: ablation.gather(1, both[:, :, None].expand(-1, -1, ablation.shape[2])).cpu().numpy(),
            INPUT_X_GRADIENT: input_x_gradient(model, images, both, tuple(self.run.attrs["patch_size"]), self.run.grid, rows_with_grad).reshape(n, 2, -1).cpu().numpy(),
        }
        if self.variant != "vanilla":
            computed[CDAM_NAMES["vanilla"]] = self.explainer.explain(images, both).cdam.reshape(n, 2, -1).cpu().numpy()
        own = maps[self.own][usable]
        if np.isnan(own[classes >= 0]).any():  # neither stored nor derivable from a basis: the engine, with the run's variant
            variant = VariantConfig(self.variant, **{k: v for k, v in self.run.attrs.get("variant", {}).items() if k != "variant"})
            engine = self.explainer.explain(images, both, keys=list(keys), variant=variant).cdam.reshape(n, 2, -1).cpu().numpy()
            computed[self.own] = np.where(np.isnan(own), engine, own)
        for method, values in computed.items():
            values[classes < 0] = np.nan
            maps[method][usable] = values

    def _deletion(self, images: torch.Tensor, classes: np.ndarray, usable: np.ndarray, maps: dict[str, np.ndarray], drops: dict[str, np.ndarray]) -> None:
        """Every method's deletion curves of the predicted class, in one batch per step, into ``drops`` at ``usable``."""
        pred_maps = np.stack([maps[method][usable, 0] for method in self.methods], axis=1)  # (u, M, N)
        orders = metrics.deletion_orders(np.nan_to_num(pred_maps.reshape(-1, pred_maps.shape[2]), nan=0.0))  # (u * M, 2, N)
        as_tensor = (lambda values: torch.from_numpy(values).to(self.device))
        curves = deletion_drops(self.model.model, images, as_tensor(classes[:, 0]), as_tensor(orders).view(len(pred_maps), -1, orders.shape[2]),
                                as_tensor(self.removed), self._rows(images))
        curves = curves.view(len(pred_maps), len(self.methods), 2, -1).cpu().numpy()
        for position, method in enumerate(self.methods):
            has_map = ~np.isnan(pred_maps[:, position]).any(axis=1)
            drops[method][np.flatnonzero(usable)[has_map]] = curves[has_map, position]

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
            self.notes.append(f"the model's logits on the images differ from the run's by {error:.1e} (relative): TAM, deletion and input x gradient describe a slightly different computation")

    def _columns(self, rows: np.ndarray, keys: np.ndarray, classes: np.ndarray, maps: dict[str, np.ndarray], drops: dict[str, np.ndarray]) -> dict[str, list]:
        """The images table's columns: one row per image and method."""
        columns: dict[str, list] = {f.name: [] for f in IMAGES_SCHEMA}
        tam = maps.get(TAM)
        for method in self.methods:
            pred, other = maps[method][:, 0], maps[method][:, 1]
            measured = {
                "compactness": metrics.compactness(pred),
                "gini": metrics.gini(pred),
                "correctness_spearman": metrics.spearman(pred, tam[:, 0]) if tam is not None else np.full(len(rows), np.nan),
                "deletion_auc_gap": metrics.deletion_gap(drops[method], self.removed),
                "class_similarity": metrics.cosine(pred, other),
                "class_similarity_spearman": metrics.spearman(pred, other),
            }
            columns["key"] += keys.tolist()
            columns["row"] += rows.tolist()
            columns["method"] += [method] * len(rows)
            columns["class"] += classes[:, 0].tolist()
            columns["other_class"] += classes[:, 1].tolist()
            for name, values in measured.items():
                columns[name] += values.tolist()
            columns["deletion_most_first"] += [None if np.isnan(c).any() else c.tolist() for c in drops[method][:, 0]]
            columns["deletion_least_first"] += [None if np.isnan(c).any() else c.tolist() for c in drops[method][:, 1]]
        return columns


def _summary(images: pa.Table, methods: list[str]) -> pa.Table:
    """Per method: every measure averaged over the images that have it, and how many images have a map."""
    method_of = np.asarray(images.column("method").to_pylist(), dtype=object)
    rows = []
    for method in methods:
        mine = method_of == method
        values = {name: images.column(name).to_numpy(zero_copy_only=False)[mine].astype(np.float64) for name in MEASURES}
        with np.errstate(invalid="ignore"):
            means = {name: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for name, v in values.items()}
        rows.append({"method": method, **means, "n_images": int(np.isfinite(values["compactness"]).sum())})
    return pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA)
