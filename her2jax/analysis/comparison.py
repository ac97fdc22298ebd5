"""Comparison of two runs on the same patients (the library behind `python -m her2jax.compare`):
their patient predictions, paired by patient, and the paired DeLong test of their AUCs.
"""
from __future__ import annotations

import csv
import io
import sys
from typing import Any

import numpy as np

from her2jax.analysis import evaluation, stats
from her2jax.errors import BadInput, MissingInput
from her2jax.run_folder import RunFolder


def read_predictions(workdir: str, split: str, *, evaluate_missing: bool = True,
                     progress: bool = True) -> dict[str, tuple[int, float]]:
    """{patient_id: (label, probability)} from RUN/eval/<split>/predictions.csv."""
    path = RunFolder(workdir).predictions(split)
    if not path.exists():
        if not evaluate_missing:
            raise MissingInput(f"{path} is missing; run python -m her2jax.evaluate "
                               f"--workdir {workdir} --split {split}")

        print(f"evaluating {workdir} on {split} first", file=sys.stderr)
        evaluation.evaluate_run(workdir, split=split, progress=progress)
    rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
    return {row["patient_id"]: (int(row["label"]), float(row["probability"])) for row in rows}


def compare(a: dict[str, tuple[int, float]], b: dict[str, tuple[int, float]], *,
            level: float = 0.95, names: tuple[str, str] = ("A", "B")) -> dict[str, Any]:
    """Paired DeLong test on the patients both prediction tables share (they must be the same)."""
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        raise BadInput(
            f"the runs were evaluated on different patients ({len(only_a)} only in {names[0]}: "
            f"{only_a[:5]}; {len(only_b)} only in {names[1]}: {only_b[:5]}); evaluate both on "
            f"the same split of the same dataset")
    patients = sorted(a)
    disagree = [p for p in patients if a[p][0] != b[p][0]]
    if disagree:
        raise BadInput(f"the runs disagree on the labels of {disagree[:5]}: not the same data")
    labels = np.array([a[p][0] for p in patients])
    result = stats.delong_paired_test(labels, np.array([a[p][1] for p in patients]),
                                      np.array([b[p][1] for p in patients]), level=level)
    return dict(result, run_a=names[0], run_b=names[1], patients=len(patients))
