"""Evaluate a trained run on a split: `python -m her2jax.evaluate --workdir RUN [--split test]
[--data_dir PATH] [--checkpoint best|latest|STEP] [--out DIR]`. `--workdir RUN1 RUN2 ...`
evaluates several runs in one process (the members of a pack), each as if alone; a run that
fails is reported and the others go on (exit code 1 if any failed).

Writes under RUN/eval/<split>/ (RUN/eval/<split>_<checkpoint>/ for a checkpoint other than the
best, e.g. eval/test_latest, eval/test_6, so the best one's results stay; or --out):
    metrics.json             slice- and patient-level AUC with bootstrap CIs (patients resampled,
                             seeded); accuracy, balanced accuracy, sensitivity, specificity, PPV,
                             NPV, F1 at the threshold chosen on the validation split (Youden's J)
                             and at 0.5; the majority-class baseline; counts; every aggregation
                             rule; calibration; a per-cohort breakdown when the split holds several
    predictions.csv          one row per patient: id, cohort, label, probability, slices, decision
    slice_predictions.csv    one row per slice
    roc.png, calibration.png
    report.md                the above for a reader

The threshold is fixed on the validation split of the run's own training data before the
evaluated split is looked at. Data prepared differently from the run's training data (another
normalisation, N4, size, crop, slices, phases, or another normalisation fit) is refused, naming
what differs; an external cohort is prepared with `--fit_from` the training dataset and the same
parameters (see README, "External validation").
"""
from __future__ import annotations

import argparse
import sys

from etils import epath

from her2jax.analysis import metrics
from her2jax.analysis.evaluation import evaluate_run, format_number
from her2jax.errors import UserError
from her2jax.run_folder import RunFolder


def _checkpoint(text: str) -> str:
    if text in ("best", "latest") or text.isdigit():
        return text
    raise argparse.ArgumentTypeError(f"best, latest or a step number, got {text!r}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m her2jax.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, nargs="+",
                        help="run folder(s) (python -m her2jax.main)")
    parser.add_argument("--split", default="test", help="split to evaluate (default test)")
    parser.add_argument("--data_dir", help="prepared dataset (default: the run's own)")
    parser.add_argument("--checkpoint", default="best", type=_checkpoint,
                        help="best, latest or a step number")
    parser.add_argument("--out", help="output folder (default RUN/eval/<split>, or "
                                      "RUN/eval/<split>_<checkpoint> for another checkpoint)")
    parser.add_argument("--aggregation", choices=metrics.AGGREGATIONS,
                        help="slice -> patient rule (default: the run's)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--multihost", choices=("auto", "on", "off"), default="auto",
                        help="several processes (TPU pod slices: on), as her2jax.main")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out and len(args.workdir) > 1:
        print("error: --out needs a single --workdir", file=sys.stderr)
        return 2
    try:
        from her2jax import distributed

        distributed.initialize(args.multihost)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    failed = 0
    for workdir in args.workdir:
        try:
            result = evaluate_run(workdir, split=args.split, data_dir=args.data_dir,
                                  checkpoint=args.checkpoint, out=args.out,
                                  aggregation=args.aggregation, samples=args.bootstrap,
                                  seed=args.seed, batch_size=args.batch_size,
                                  progress=not args.quiet)
        except (UserError, OSError) as error:
            print(f"error: {error}" if len(args.workdir) == 1 else f"error: {workdir}: {error}",
                  file=sys.stderr)
            failed += 1
            continue
        patient = result["patient"]
        rates = patient["at_validation_threshold"]
        print(f"{result['split']}: patient AUC {format_number(patient['auc'])} "
              f"[{format_number(patient['auc_ci_low'])}, "
              f"{format_number(patient['auc_ci_high'])}]  sensitivity "
              f"{format_number(rates['sensitivity'])}  specificity "
              f"{format_number(rates['specificity'])}  ({result['patients']} patients)")
        print(epath.Path(args.out) if args.out else
              RunFolder(workdir).eval_dir(args.split, args.checkpoint))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
