"""``cdam evaluate DEST``: the paper's benchmarks of a run's maps on a seeded sample of its images
(library: ``cdam_worker.evaluate``)."""

from __future__ import annotations

import argparse
import sys

from jobs.model_flags import add_address_flag, add_model_flags, model_spec
from jobs.command import add_run_command

EPILOG = """\
measures, per image, of the map of the predicted class (spec section 5), averaged per method with a 95%
percentile bootstrap interval of the mean (1,000 resamples of the images) and the number of images:
  compactness          share of tokens with |s| < 0.05 max|s| (higher: fewer tokens carry the relevance)
  gini                 Gini index of |s|
  Spearman/TAM         rank correlation with token ablation (TAM: the logit's drop when one token is removed)
  deletion gap         area between the deletion curves (the logit's drop with the most relevant tokens removed
                       first, minus with the least relevant first, over the share removed; in logits)
  deletion/insertion   area under the class's logit (and its probability) as the most relevant tokens are
                       removed first (lower: better) / inserted first into the prefix tokens (higher: better)
  class sim. cos/rho   cosine / Spearman similarity with the map of the runner-up class (lower: more
                       class-discriminative; the attention map (AM) is the same for every class: 1)
  sanity               Spearman and SSIM of the map before and after randomising the head, the last block, the
                       head and the last K blocks (cascade_K), and the labels (only the linear head refit on
                       shuffled labels, features frozen); on the first --sanity images. Low: the map depends on
                       the model. AM does not depend on the head: 1 after the head's randomisation
  max-sensitivity      largest relative change of the map under --perturbations uniform perturbations of
                       +-radius that keep the prediction; FGSM: the change after one --fgsm-eps step

methods (--methods: comma-separated keys, 'cheap' (the default: all but ig and smoothgrad) or 'all'); the cost
per image, for K = 2 classes (the predicted and the runner-up):
  cdam        CDAM                         stored (a Smooth/Integrated run adds vanilla CDAM: one forward)
  tam         TAM                          one forward per patch token (196 on ViT-S/16), no backward
  am          AM                           stored
  ixg         Input x gradient             K forwards + backwards
  rollout     Attention rollout            one forward
  gradattn    Gradient-weighted attention  K forwards + backwards
  lrp         Relevance propagation        K forwards + backwards + relevance passes (about 3 forwards each)
  ig          Integrated Gradients         K x --ig-steps forwards + backwards
  smoothgrad  SmoothGrad                   K x --smoothgrad-samples forwards + backwards
The deletion and insertion curves cost 2 x (--steps + 1) forwards per method (of shorter sequences). The
sanity checks recompute each method (for one class) on 2 + L randomised models (L blocks; one more with
labels), the robustness checks on 2 + --perturbations inputs. bench/bench_evaluate.py measures it all.
Without the model (--no-model) only the stored maps (CDAM, AM) are measured: compactness, Gini, class sensitivity.

writes DEST/evaluation/summary.parquet (one row per method), images.parquet (per image and method, with the
deletion and insertion curves) and sanity.parquet (one row per method and randomisation).

examples:
  cdam evaluate out --sample 1000
  cdam evaluate out --sample 200 --methods all --sanity 32
  cdam evaluate s3://bucket/cdam/val --checkpoint model.pt --sample 200 --steps 20 --methods cdam,tam,lrp
"""


HELP = "measure the maps like the paper: compactness, correctness, class sensitivity, sanity, robustness"
DESCRIPTION = "Compare CDAM with the other importance estimators of the CDAM paper (token ablation, the attention map, attention rollout, the attention-gradient methods and relevance propagation of Chefer et al., input x gradient, Integrated Gradients, SmoothGrad) on a seeded sample of a run's images (the paper's benchmarks), run the sanity (randomisation) and robustness checks, and write the results into the run."


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = add_run_command(commands, "evaluate", HELP, DESCRIPTION, EPILOG)
    parser.add_argument(
        "--sample",
        type=int,
        default=1000,
        metavar="N",
        help="images evaluated, drawn at random (default: 1000, the paper's; all if the run has fewer)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample (default: 0)")
    parser.add_argument(
        "--steps",
        type=int,
        default=10,
        help="points of each deletion curve after the first (default: 10, i.e. 10%% of the tokens per step)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="images per step (default: 16)")
    parser.add_argument(
        "--device", default=None, help="where the model runs: cpu or cuda[:N] (default: cuda if available, else cpu)"
    )
    parser.add_argument(
        "--methods",
        default="cheap",
        metavar="LIST",
        help="methods to compare: comma-separated keys (see below), 'cheap' (default) or 'all'",
    )
    parser.add_argument(
        "--ig-steps", type=int, default=16, help="Integrated Gradients' steps from the zero input (default: 16)"
    )
    parser.add_argument(
        "--smoothgrad-samples",
        type=int,
        default=16,
        help="SmoothGrad's noisy copies per image (noise 0.15 x the value range; default: 16)",
    )
    parser.add_argument(
        "--sanity",
        type=int,
        default=16,
        metavar="N",
        help="images of the sanity checks, the sample's first (default: 16; 0: none)",
    )
    parser.add_argument(
        "--robustness",
        type=int,
        default=16,
        metavar="N",
        help="images of the robustness checks, the sample's first (default: 16; 0: none)",
    )
    parser.add_argument(
        "--perturbations", type=int, default=8, help="max-sensitivity's random perturbations per image (default: 8)"
    )
    parser.add_argument(
        "--radius", type=float, default=0.02, help="their size, x the image's value range (default: 0.02)"
    )
    parser.add_argument(
        "--fgsm-eps", type=float, default=0.01, help="the FGSM step, x the image's value range (default: 0.01)"
    )
    parser.add_argument(
        "--no-model", action="store_true", help="measure only the stored maps (no model-side method, curves or checks)"
    )
    add_address_flag(parser, "one per shard's images of the sample (the sanity and robustness checks run here)")
    add_model_flags(parser, "needed for every method but the stored CDAM and AM, for the curves and for the checks")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from cdam_worker.evaluate import (
        EvaluateSettings,
        evaluate_run,
        format_summary,
        write_evaluation,
    )
    from cdam_worker.reading import RunError, open_run

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = EvaluateSettings(
        sample=args.sample,
        seed=args.seed,
        steps=args.steps,
        batch=args.batch_size,
        device=device,
        methods=args.methods,
        ig_steps=args.ig_steps,
        smoothgrad_samples=args.smoothgrad_samples,
        sanity=args.sanity,
        robustness=args.robustness,
        perturbations=args.perturbations,
        radius=args.radius,
        fgsm_eps=args.fgsm_eps,
    )
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
        evaluation = evaluate_run(run_, model, settings, address=args.address)
        check_lock()
        write_evaluation(run_, evaluation, settings)
    for note in evaluation.notes:
        print(f"note: {note}", file=sys.stderr)
    print(format_summary(evaluation.summary))
    written = "summary.parquet, images.parquet" + (" and sanity.parquet" if evaluation.sanity is not None else "")
    print(f"output: {run_.url}/evaluation/: {written}")
    return 0
