"""Patient-level splits: the source's own when it gives one, else a seeded stratified split."""
from __future__ import annotations

import collections

import numpy as np

from data_prep.params import SPLITS, PrepParams
from data_prep.sources import Case


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
    """Groups cases by split; fails loudly if a patient would land in two splits."""
    undecided = [c for c in cases if c.split is None]
    seeded = seeded_split(undecided, params.split_seed, params.split_fractions)
    by_split: dict[str, list[Case]] = {name: [] for name in SPLITS}
    for case in cases:
        by_split[case.split or seeded[case.patient_id]].append(case)
    seen = collections.Counter(c.patient_id for group in by_split.values() for c in group)
    repeated = [pid for pid, n in seen.items() if n > 1]
    assert not repeated, f"patients in more than one split: {repeated[:5]}"
    return by_split


def describe(cases: list[Case], params: PrepParams) -> str:
    seeded = sum(c.split is None for c in cases)
    if seeded == 0:
        return "from the source"
    rule = (f"seeded patient-level split stratified by label (seed {params.split_seed}, "
            f"fractions {params.split_fractions})")
    return rule if seeded == len(cases) else f"from the source; {seeded} patients by {rule}"
