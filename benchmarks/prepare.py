"""Preparation throughput: patients per second for 1 and 2 workers, with and without N4.

    python benchmarks/prepare.py [--patients 24] [--size 128] [--slices 32] [--repeats 3]
                                 [--normalization per_channel_clip_q98] [--workers 1,2]

Writes a synthetic cohort once, then times `data_prep.prepare` end to end (reading NIfTI, [N4],
normalisation, slicing, PNG encoding, TFRecord writing, report) for each setting, `--repeats`
times, into fresh data directories. Prints the median and the spread, and the speed-up of two
workers over one. Worker start-up (spawn) is part of the time, as it is for a user.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_prep import normalization, prepare, synthetic  # noqa: E402


def time_prepare(source: str, workers: int, n4: bool, image_size: int,
                 normalization: str) -> float:
    with tempfile.TemporaryDirectory() as data_dir:
        argv = ["--source", source, "--data_dir", data_dir, "--workers", str(workers),
                "--image_size", str(image_size), "--normalization", normalization,
                "--quiet"] + (["--n4"] if n4 else [])
        start = time.perf_counter()
        builder = prepare.build(prepare.parse_args(argv))
        elapsed = time.perf_counter() - start
        assert builder.info.splits["train"].num_examples > 0
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=24)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--normalization", default="per_channel_clip_q98",
                        choices=normalization.names(),
                        help="e.g. nyul, which is fitted on the training split first")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    args = parser.parse_args(argv)
    worker_counts = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as cohort:
        synthetic.generate_cohort(cohort, patients=args.patients, seed=0, size=args.size,
                                  slices=args.slices)
        print(f"synthetic cohort: {args.patients} patients, {args.size}x{args.size}x{args.slices}, "
              f"{os.cpu_count()} CPU cores; normalization {args.normalization}; "
              f"{args.repeats} runs each")
        print(f"| N4 | workers | median s | min-max s | patients/s | speed-up vs {worker_counts[0]} "
              f"worker{'s' if worker_counts[0] > 1 else ''} |")
        print("|---|---|---|---|---|---|")
        for n4 in (False, True):
            baseline = None
            for workers in worker_counts:
                times = [time_prepare(cohort, workers, n4, args.image_size, args.normalization)
                         for _ in range(args.repeats)]
                median = statistics.median(times)
                baseline = baseline or median
                print(f"| {'yes' if n4 else 'no'} | {workers} | {median:.2f} | "
                      f"{min(times):.2f}-{max(times):.2f} | {args.patients / median:.2f} | "
                      f"{baseline / median:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
