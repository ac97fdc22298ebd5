"""Compare two runs on the same patients: `python -m her2jax.compare RUN_A RUN_B [--split test]`.

A paired DeLong test of the two patient-level AUCs (DeLong, DeLong & Clarke-Pearson 1988): both
AUCs are computed on the same patients, so their errors are correlated and the test uses the
covariance of the two sets of placement values. Prints the AUCs, the difference A - B with its
confidence interval, z and the two-sided p-value, and writes them as JSON. Each run's
`eval/<split>/predictions.csv` is used (written by `python -m her2jax.evaluate`, which runs first
when the file is missing). Runs evaluated on different patients, or whose labels disagree, are
refused: "model A outperforms model B" needs the same cases.
"""
from __future__ import annotations

import argparse
import sys

from etils import epath

from her2jax import files
from her2jax.analysis.comparison import compare, read_predictions
from her2jax.errors import UserError
from her2jax.run_folder import RunFolder


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m her2jax.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a")
    parser.add_argument("run_b")
    parser.add_argument("--split", default="test")
    parser.add_argument("--level", type=float, default=0.95, help="confidence level of the CI")
    parser.add_argument("--out", help="JSON file (default RUN_A/eval/<split>/compare_<B>.json)")
    parser.add_argument("--no_evaluate", action="store_true",
                        help="fail instead of evaluating a run without predictions")
    return parser.parse_args(argv)


def undefined_reason(result: dict) -> str | None:
    """Why the test's NaN figures are NaN (see `stats.delong_paired_test`), or None."""
    if result["positives"] == 0 or result["negatives"] == 0:
        return "the test needs both classes among the patients: every figure is undefined"
    if min(result["positives"], result["negatives"]) < 2:
        return ("a class with a single patient: the variance, CI, z and p are undefined; "
                "evaluate on more patients")
    if result["standard_error"] == 0.0 and result["difference"] == 0.0:
        return "the two runs rank the patients alike (variance 0): no evidence of a difference"
    if result["standard_error"] == 0.0:
        return ("the per-patient differences are one constant (variance 0): z and p are "
                "undefined, the difference is exact")
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        a = read_predictions(args.run_a, args.split, evaluate_missing=not args.no_evaluate)
        b = read_predictions(args.run_b, args.split, evaluate_missing=not args.no_evaluate)
        result = compare(a, b, level=args.level, names=(args.run_a, args.run_b))
    except (UserError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    out = epath.Path(args.out) if args.out else (
        RunFolder(args.run_a).eval_dir(args.split)
        / f"compare_{epath.Path(args.run_b).name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    files.write_json(out, dict(result, split=args.split), indent=2)
    level = int(round(args.level * 100))
    print(f"{args.split}, {result['patients']} patients ({result['positives']} HER2-positive)")
    print(f"  A {args.run_a}: AUC {result['auc_a']:.3f}")
    print(f"  B {args.run_b}: AUC {result['auc_b']:.3f}")
    print(f"  A - B = {result['difference']:+.3f}  {level}% CI [{result['ci_low']:+.3f}, "
          f"{result['ci_high']:+.3f}]  z = {result['z']:.2f}  p = {result['p_value']:.4f} "
          f"(paired DeLong)")
    reason = undefined_reason(result)
    if reason:
        print(f"  {reason}")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
