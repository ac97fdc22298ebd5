"""Command line: ``python -m data_prep.synthetic --out DIR [--patients N] [--seed S] ...``."""

from __future__ import annotations

import argparse
import csv
import pathlib
import sys
from collections.abc import Sequence

import numpy as np

from data_prep.synthetic.cohort import MIN_SIZE, MIN_SLICES, generate_cohort
from data_prep.synthetic.planted import ORACLE_AUC, SITES


def _summary(csv_path: pathlib.Path) -> str:
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    n_pos = sum(int(r["HER2"]) for r in rows)
    per_site = "/".join(str(sum(r["dataset"] == s for r in rows)) for s in SITES)
    per_split = "/".join(str(sum(int(r["test"]) == s for r in rows)) for s in (0, 1, 2))
    with open(csv_path.parent / "ground_truth.csv", newline="") as handle:
        truth = {r["pid"]: float(r["oracle_score"]) for r in csv.DictReader(handle)}
    realised = pair_auc([int(r["HER2"]) for r in rows], [truth[r["pid"]] for r in rows])
    on_cohort = "n/a: one class only" if realised is None else f"{realised:.3f}"
    return (f"synthetic cohort: {len(rows)} patients, {n_pos} HER2+ ({n_pos / len(rows):.0%}), "
            f"sites a/b/c {per_site}, train/test/val {per_split}, "
            f"oracle AUC {on_cohort} on these patients ({ORACLE_AUC:.3f} expected)")


def pair_auc(labels: Sequence[int], scores: Sequence[float]) -> float | None:
    """AUC as the share of (positive, negative) pairs ordered by the score (ties count half);
    None without both classes."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    positive, negative = scores[labels == 1], scores[labels == 0]
    if positive.size == 0 or negative.size == 0:
        return None
    difference = positive[:, None] - negative[None, :]
    return float(((difference > 0).sum() + 0.5 * (difference == 0).sum()) / difference.size)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.synthetic",
        description="Write a synthetic DCE-MRI HER2 cohort in the BreastDCEDL layout.",
    )
    parser.add_argument("--out", required=True, type=pathlib.Path, help="output directory")
    parser.add_argument("--patients", type=int, default=40, help="number of patients (>= 1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (>= 0)")
    parser.add_argument("--size", type=int, default=128,
                        help=f"in-plane matrix size in pixels (>= {MIN_SIZE})")
    parser.add_argument("--slices", type=int, default=32,
                        help=f"number of slices (>= {MIN_SLICES})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns 0 on success, exits with status 2 on bad arguments."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.patients < 1:
        parser.error(f"--patients must be >= 1, got {args.patients}")
    if args.size < MIN_SIZE:
        parser.error(f"--size must be >= {MIN_SIZE}, got {args.size}")
    if args.slices < MIN_SLICES:
        parser.error(f"--slices must be >= {MIN_SLICES}, got {args.slices}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    csv_path = generate_cohort(args.out, args.patients, args.seed, args.size, args.slices)
    print(_summary(csv_path))
    print(csv_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
