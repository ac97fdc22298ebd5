"""The patient-level split rule: seeded, stratified, and the source's own split first."""
from __future__ import annotations

import collections
import dataclasses
import os

import numpy as np
import pytest

from conftest import write_cohort, write_csv
from data_prep import splits
from data_prep.params import PrepParams
from data_prep.sources import Case


def make_cases(n: int = 400, positives: int = 100, prefix: str = "P") -> list[Case]:
    return [Case(patient_id=f"{prefix}{i:04d}", label=int(i < positives), cohort="c",
                 phases=("a", "b", "c"), box=(0, 0, 0, 0, 0, 0)) for i in range(n)]


def test_seeded_split_deterministic_and_order_free():
    cases = make_cases()
    first = splits.seeded_split(cases, 0, (0.7, 0.15, 0.15))
    again = splits.seeded_split(list(reversed(cases)), 0, (0.7, 0.15, 0.15))
    assert first == again
    assert set(first) == {c.patient_id for c in cases}
    other = splits.seeded_split(cases, 1, (0.7, 0.15, 0.15))
    assert other != first
    changed = sum(first[p] != other[p] for p in first)
    assert changed > 50


@pytest.mark.parametrize("fractions", [(0.7, 0.15, 0.15), (0.6, 0.2, 0.2), (0.5, 0.5, 0.0)])
def test_seeded_split_stratified_and_fractions(fractions):
    cases = make_cases(n=400, positives=100)
    assignment = splits.seeded_split(cases, 3, fractions)
    labels = {c.patient_id: c.label for c in cases}
    for label, total in ((1, 100), (0, 300)):
        counts = collections.Counter(assignment[p] for p in labels if labels[p] == label)
        for name, fraction in zip(("train", "validation", "test"), fractions):
            assert abs(counts[name] - fraction * total) <= 1, (label, name, counts)
    overall = 100 / 400
    for name, fraction in zip(("train", "validation", "test"), fractions):
        members = [p for p, s in assignment.items() if s == name]
        assert abs(len(members) - fraction * 400) <= 2
        if members:
            share = np.mean([labels[p] for p in members])
            assert abs(share - overall) < 0.02


def test_assign_patient_level_and_source_split_wins():
    cases = make_cases(n=60, positives=15)
    # a third of the patients carry their own split; it must be kept
    own = {c.patient_id: ("test" if i % 2 else "validation")
           for i, c in enumerate(cases) if i % 3 == 0}
    cases = [dataclasses.replace(c, split=own.get(c.patient_id)) for c in cases]
    params = PrepParams(split_seed=4)
    by_split = splits.assign(cases, params)
    where = {}
    for name, group in by_split.items():
        for case in group:
            assert case.patient_id not in where, "patient in two splits"
            where[case.patient_id] = name
    assert set(where) == {c.patient_id for c in cases}
    for pid, split in own.items():
        assert where[pid] == split
    undecided = [c for c in cases if c.split is None]
    seeded = splits.seeded_split(undecided, 4, params.split_fractions)
    for case in undecided:
        assert where[case.patient_id] == seeded[case.patient_id]
    assert "from the source" in splits.describe(cases, params)
    assert "seed 4" in splits.describe(cases, params)
    assert splits.describe([c for c in cases if c.split], params) == "from the source"
    assert "seed 4" in splits.describe(undecided, params)


def test_a_patient_listed_twice_is_refused_naming_it_and_its_splits():
    """A real check, not an assert (gone under python -O): one line naming the patient."""
    from her2jax.errors import BadInput

    cases = make_cases(n=10, positives=3)
    cases += [dataclasses.replace(cases[2], split="test"), dataclasses.replace(cases[2])]
    with pytest.raises(BadInput, match=r"1 patient\(s\) listed more than once by the source, .*"
                                       r"P0002 in (\w+), \1, test"):
        splits.assign(cases, PrepParams(split_seed=0))


def test_seeded_split_end_to_end_patient_level(tmp_path, capsys):
    """A BreastDCEDL CSV without `test`: every patient in exactly one split, all its slices too."""
    from conftest import prepare_args
    from data_prep import prepare
    import tensorflow_datasets as tfds

    folder = str(tmp_path / "cohort")
    rows = write_cohort(folder, patients=12, times=3)
    columns = [c for c in rows[0] if c != "test"]
    write_csv(os.path.join(folder, "metadata.csv"), rows, columns)
    assert prepare.main(prepare_args(folder, str(tmp_path / "out"), "--slices_per_patient", "3",
                                     "--split_seed", "5")) == 0
    builder = tfds.builder_from_directory(capsys.readouterr().out.strip().splitlines()[-1])
    cases = [Case(patient_id=r["pid"], label=int(r["HER2"]), cohort="spy2", phases=("", "", ""))
             for r in rows]
    expected = splits.seeded_split(cases, 5, (0.7, 0.15, 0.15))
    seen = collections.defaultdict(set)
    slices_of = collections.Counter()
    for name in builder.info.splits:
        for example in builder.as_dataset(split=name).as_numpy_iterator():
            pid = example["patient_id"].decode()
            seen[pid].add(name)
            slices_of[pid] += 1
    assert all(len(names) == 1 for names in seen.values())
    assert {pid: names.pop() for pid, names in seen.items()} == expected
    assert set(slices_of.values()) == {3}
    assert "seed 5" in builder.info.metadata["split_rule"]
