"""Patient-level splits: the source's own when it gives one, else a seeded stratified split."""
from __future__ import annotations

import collections

import numpy as np

from data_prep.params import SPLITS, PrepParams
from data_prep.sources import Case
from her2jax.errors import BadInput


def seeded_split(cases: list[Case], seed: int,
                 fractions: tuple[float, float, float]) -> dict[str, str]:
    """patient_id -> train/validation/test, stratified by label.

    Within each label the patients are sorted by id, shuffled with `seed`, and cut at the
    cumulative fractions (rounded), so the split depends only on the ids, labels and seed.
    """
    assignment = {}
    for label in sorted({c.label for c in cases}):
        ids = sorted(c.patient_id for c in cases if c.label == label)
        order = np.random.default_rng([seed, label]).permutation(len(ids))
        cuts = np.round(np.cumsum(fractions)[:2] * len(ids)).astype(int)
        for position, index in enumerate(order):
            split = "train" if position < cuts[0] else "validation" if position < cuts[1] else "test"
            assignment[ids[index]] = split
    return assignment


def assign(cases: list[Case], params: PrepParams) -> dict[str, list[Case]]:
    """Groups cases by split; refuses (BadInput, also under `python -O`) a patient the source
    lists more than once, naming the patients and the splits they would land in."""
    undecided = [c for c in cases if c.split is None]
    seeded = seeded_split(undecided, params.split_seed, params.split_fractions)
    by_split: dict[str, list[Case]] = {name: [] for name in SPLITS}
    for case in cases:
        by_split[case.split or seeded[case.patient_id]].append(case)
    seen = collections.defaultdict(list)
    for name, group in by_split.items():
        for case in group:
            seen[case.patient_id].append(name)
    repeated = {pid: names for pid, names in seen.items() if len(names) > 1}
    if repeated:
        shown = "; ".join(f"{pid} in {', '.join(names)}" for pid, names in
                          list(repeated.items())[:5])
        raise BadInput(f"{len(repeated)} patient(s) listed more than once by the source, which "
                       f"would put one patient's slices in several splits (or twice in one): "
                       f"{shown}")
    return by_split


def describe(cases: list[Case], params: PrepParams) -> str:
    seeded = sum(c.split is None for c in cases)
    if seeded == 0:
        return "from the source"
    rule = (f"seeded patient-level split stratified by label (seed {params.split_seed}, "
            f"fractions {params.split_fractions})")
    return rule if seeded == len(cases) else f"from the source; {seeded} patients by {rule}"
