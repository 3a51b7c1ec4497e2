"""``cdam evaluate DEST``: the paper's benchmarks of a run's maps on a seeded sample of its images
(library: ``cdam_worker.evaluate``)."""

from __future__ import annotations

import argparse
import sys

from jobs.model_flags import add_model_flags, model_spec

EPILOG = """\
measures, per image, of the map of the predicted class (spec section 5), averaged per method:
  compactness          share of tokens with |s| < 0.05 max|s| (higher: fewer tokens carry the relevance)
  gini                 Gini index of |s|
  Spearman/TAM         rank correlation with token ablation (TAM: the logit's drop when one token is removed)
  deletion gap         area between the deletion curves (the logit's drop with the most relevant tokens removed
                       first, minus with the least relevant first, over the share removed; in logits)
  class sim. cos/rho   cosine / Spearman similarity with the map of the runner-up class (lower: more
                       class-discriminative; the attention map (AM) is the same for every class: 1)
methods: CDAM (and Smooth/Integrated CDAM if the run used them), TAM, AM (the stored attention, mean over
heads), input x gradient (summed over each token's pixels). TAM, input x gradient and deletion need the
model; without it only the stored maps' compactness and class sensitivity are measured.

writes DEST/evaluation/summary.parquet (one row per method) and DEST/evaluation/images.parquet (per image
and method, with the deletion curves).

examples:
  cdam evaluate out --sample 1000
  cdam evaluate s3://bucket/cdam/val --checkpoint model.pt --sample 200 --steps 20
"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("evaluate", help="measure the maps like the paper: compactness, correctness, class sensitivity", description="Compare CDAM with the attention map, token ablation and input x gradient on a seeded sample of a run's images (the CDAM paper's benchmarks) and write the results into the run.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", metavar="DEST", help="the run: output folder or s3://bucket/prefix")
    parser.add_argument("--sample", type=int, default=1000, metavar="N", help="images evaluated, drawn at random (default: 1000, the paper's; all if the run has fewer)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample (default: 0)")
    parser.add_argument("--steps", type=int, default=10, help="points of each deletion curve after the first (default: 10, i.e. 10%% of the tokens per step)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per step (default: 16)")
    parser.add_argument("--device", default=None, help="where the model runs: cpu or cuda[:N] (default: cuda if available, else cpu)")
    parser.add_argument("--no-model", action="store_true", help="measure only the stored maps (no TAM, input x gradient or deletion curves)")
    add_model_flags(parser, "needed for TAM, input x gradient and the deletion curves")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from cdam_worker.evaluate import EvaluateSettings, evaluate_run, format_summary, write_evaluation
    from cdam_worker.reading import RunError, open_run

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = EvaluateSettings(sample=args.sample, seed=args.seed, steps=args.steps, batch=args.batch_size, device=device)
    run_ = open_run(args.output)
    model, spec = None, model_spec(args)
    if not args.no_model:
        try:
            model = run_.load_model(spec)
        except RunError as error:
            if spec is not None:  # the model asked for by flags must load
                raise
            print(f"note: {error}; going on without it", file=sys.stderr)
    with run_.exclusive("evaluate") as check_lock:
        evaluation = evaluate_run(run_, model, settings)
        check_lock()
        write_evaluation(run_, evaluation, settings)
    for note in evaluation.notes:
        print(f"note: {note}", file=sys.stderr)
    print(format_summary(evaluation.summary))
    print(f"output: {run_.url}/evaluation/summary.parquet and images.parquet")
    return 0
