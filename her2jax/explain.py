"""Where a trained model looks: `python -m her2jax.explain --workdir RUN [--split test]
[--patients N | --patient_ids A,B] [--checkpoint best] [--out DIR]`.

For each chosen patient (N patients, HER2-positive and negative alternately, in id order) and
each of its slices, one PNG with the fused slice and the heat maps over it, the tumour outlined
in green:
    ResNet    Grad-CAM of the HER2-positive logit from the last stage, and from the deepest
              stage with at least 4 x 4 cells when the last one is coarser (small images); with
              the triple head one map per head from its own stage; the gate of every
              spatial-attention module
    ViT       attention rollout
Written to RUN/eval/<split>/explain/ (or --out) with `explain.json`: per slice and map, the share
of the heat inside the tumour mask and the ratio of mean heat inside to outside (above 1: the
map favours the tumour). Methods and formulas: `her2jax.analysis.maps`.
"""
from __future__ import annotations

import argparse
import sys

from her2jax.analysis.explanation import explain_run
from her2jax.errors import UserError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m her2jax.explain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--patients", type=int, default=4, help="how many patients")
    parser.add_argument("--patient_ids", help="comma-separated patient ids instead")
    parser.add_argument("--checkpoint", default="best")
    parser.add_argument("--data_dir", help="prepared dataset (default: the run's own)")
    parser.add_argument("--out", help="output folder (default RUN/eval/<split>/explain)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = explain_run(args.workdir, split=args.split, patients=args.patients,
                              patient_ids=args.patient_ids.split(",") if args.patient_ids
                              else None, checkpoint=args.checkpoint, data_dir=args.data_dir,
                              out=args.out)
    except (UserError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    ratios = summary["mean_concentration_ratio"]
    for name in dict.fromkeys(name for entry in summary["slices"] for name in entry["maps"]):
        if name in ratios:
            print(f"{name}: mean heat inside / outside the tumour {ratios[name]:.2f}")
        else:
            print(f"{name}: inside / outside ratio defined on no slice (a map that is zero or "
                  f"constant, e.g. a 1x1 feature map at this image size)")
    overlays, patients = len(summary["slices"]), len(summary["patients"])
    print(f"{overlays} overlay{'s' * (overlays != 1)} of {patients} "
          f"patient{'s' * (patients != 1)} in {summary['folder']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
