"""A normalisation fitted on the training split (Nyul) reads and corrects each training case once:
the fit pass leaves the crops the write pass needs, and the written data are the same."""
from __future__ import annotations

import dataclasses
import os
import shutil

import numpy as np
import pytest

from conftest import write_cohort
from data_prep import n4, normalization, pipeline
from data_prep.params import PrepParams
from data_prep.sources import list_cases
from test_prepare import example_keys, read_examples, run_prepare

N4_FAST = ("--n4", "--n4_shrink", "2", "--n4_iterations", "5,5")


def fitted_nyul(volumes: list[np.ndarray]) -> dict:
    return normalization.nyul_fit([normalization.nyul_summarize(v) for v in volumes])


def test_nyul_from_the_summary_equals_nyul_on_the_whole_case():
    rng = np.random.default_rng(0)
    cases = [(rng.gamma(2.0, 150.0, (3, 6, 20, 20)) * (1 + c)).astype(np.float32)
             for c in range(3)]
    fitted = fitted_nyul(cases)
    phases = cases[1]
    whole = normalization.nyul(phases, fitted)
    summary = normalization.nyul_summarize(phases)
    part = (slice(None), slice(2, 5), slice(3, 17), slice(0, 9))
    np.testing.assert_array_equal(
        normalization.nyul_apply_summarized(phases[part], summary, fitted), whole[part])
    np.testing.assert_array_equal(
        normalization.nyul_apply_summarized(phases, summary, fitted), whole)
    # another case's summary gives other numbers: the summary is what the mapping uses
    other = normalization.nyul_summarize(cases[2])
    assert not np.array_equal(normalization.nyul_apply_summarized(phases, other, fitted), whole)


def test_nyul_from_the_summary_refuses_other_percentiles():
    rng = np.random.default_rng(1)
    phases = rng.uniform(0, 100, (3, 4, 8, 8)).astype(np.float32)
    fitted = fitted_nyul([phases])
    moved = dict(fitted, percentiles=[2.0] + fitted["percentiles"][1:])
    with pytest.raises(ValueError, match="percentiles"):
        normalization.nyul_apply_summarized(phases, normalization.nyul_summarize(phases), moved)


def test_only_a_fitted_strategy_can_be_applied_from_a_summary():
    with pytest.raises(ValueError, match="apply_summarized needs summarize"):
        normalization.Strategy("x", normalization.zscore,
                               apply_summarized=normalization.nyul_apply_summarized)


@pytest.mark.parametrize("n4_on", [False, True])
def test_the_write_pass_from_the_spill_equals_the_direct_one(tmp_path, n4_on):
    folder = str(tmp_path / "cohort")
    write_cohort(folder, patients=3, times=3)
    # a margin so wide that the crop (60 px) reaches outside the 40 x 40 volume
    params = PrepParams(normalization="nyul", n4=n4_on, n4_shrink=2, n4_iterations=(5, 5),
                        image_size=24, crop_margin=2.0, slices_per_patient=0)
    cases = list_cases(folder, params).cases
    fitted = normalization.nyul_fit([pipeline.summarize_case(c, params) for c in cases])
    spill = str(tmp_path / "spill")
    os.makedirs(spill)
    case = cases[0]
    direct = pipeline.prepare_case(case, params, fitted)
    summary = pipeline.summarize_case(case, params, spill)
    np.testing.assert_array_equal(summary, pipeline.summarize_case(case, params))
    assert os.listdir(spill) == [os.path.basename(pipeline.spill_path(spill, case.patient_id))]
    # the write pass must not read the files again: take them away
    shutil.rmtree(os.path.join(folder, "dce"))
    spilled = pipeline.prepare_case(case, params, fitted, spill)
    assert [s.slice_index for s in spilled.slices] == [s.slice_index for s in direct.slices]
    assert [s.slice_index for s in direct.slices] == [3, 4, 5, 6]
    for a, b in zip(direct.slices, spilled.slices):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.mask, b.mask)
    # the parts of the crop outside the volume are black, the tumour is in the mask
    assert (direct.slices[0].image[0] == 0).all() and direct.slices[0].mask.any()
    # a patient the fit pass did not see is read from its files (here: gone, so it fails)
    with pytest.raises(Exception):
        pipeline.prepare_case(cases[1], params, fitted, spill)


def test_spill_needs_a_strategy_that_can_use_it(tmp_path, monkeypatch):
    folder = str(tmp_path / "cohort")
    write_cohort(folder, patients=1, times=3)
    params = PrepParams(normalization="zscore", image_size=16)
    (case,) = list_cases(folder, params).cases
    with pytest.raises(ValueError, match="is not fitted"):
        pipeline.summarize_case(case, params)
    monkeypatch.setitem(normalization.STRATEGIES, "nyul", dataclasses.replace(
        normalization.STRATEGIES["nyul"], apply_summarized=None))
    with pytest.raises(ValueError, match="cannot be applied from a summary"):
        pipeline.summarize_case(case, dataclasses.replace(params, normalization="nyul"),
                                str(tmp_path))
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".npz")]


def test_nyul_with_n4_corrects_each_patient_once_and_writes_the_same_data(
        tmp_path, monkeypatch):
    folder = str(tmp_path / "cohort")
    rows = write_cohort(folder, patients=8, times=3)
    train = [row["pid"] for row in rows if row["test"] == 0]
    assert len(train) == 6
    fields = []
    real_field = n4.estimate_log_field
    monkeypatch.setattr(n4, "estimate_log_field",
                        lambda *args, **kw: fields.append(1) or real_field(*args, **kw))
    spilled = []
    real_spilled = pipeline._prepare_spilled
    monkeypatch.setattr(pipeline, "_prepare_spilled",
                        lambda case, *args: spilled.append(case.patient_id) or
                        real_spilled(case, *args))
    args = ("--normalization", "nyul", *N4_FAST, "--slices_per_patient", "0")

    # before: the strategy without `apply_summarized` (the fit pass leaves nothing)
    with monkeypatch.context() as patch:
        patch.setitem(normalization.STRATEGIES, "nyul", dataclasses.replace(
            normalization.STRATEGIES["nyul"], apply_summarized=None))
        rc, lines = run_prepare(folder, str(tmp_path / "twice"), *args)
    assert rc == 0 and spilled == []
    assert len(fields) == len(rows) + len(train)
    reference = read_examples(lines[-1])

    fields.clear()
    rc, lines = run_prepare(folder, str(tmp_path / "once"), *args)
    assert rc == 0
    assert len(fields) == len(rows)
    assert sorted(spilled) == train
    assert example_keys(read_examples(lines[-1])) == example_keys(reference)
    assert len(example_keys(reference)) == 4 * len(rows)

    # two worker processes: the same again
    rc, lines = run_prepare(folder, str(tmp_path / "workers"), *args, "--workers", "2")
    assert rc == 0
    assert example_keys(read_examples(lines[-1])) == example_keys(reference)
    # the fit pass's folder lives in the dataset's temporary folder and is gone with it
    assert not list((tmp_path / "workers").rglob("fit_spill_*"))
    assert not list((tmp_path / "workers").rglob("incomplete.*"))


def test_outside_the_volume_stays_black_whatever_zero_maps_to(tmp_path, monkeypatch):
    """`slices.cut` pads the 8-bit image with 0; the spilled crops are normalised before that
    padding is known to be padding, so it is restored after (Nyul maps 0 to 0 anyway)."""
    folder = str(tmp_path / "cohort")
    write_cohort(folder, patients=1, times=3)
    grey = dataclasses.replace(
        normalization.STRATEGIES["nyul"],
        apply=lambda phases, fitted: np.full(phases.shape, 7, np.uint8),
        apply_summarized=lambda voxels, summary, fitted: np.full(voxels.shape, 7, np.uint8))
    monkeypatch.setitem(normalization.STRATEGIES, "nyul", grey)
    params = PrepParams(normalization="nyul", image_size=60, crop_margin=2.0)
    (case,) = list_cases(folder, params).cases
    pipeline.summarize_case(case, params, str(tmp_path))
    direct = pipeline.prepare_case(case, params, None)
    spilled = pipeline.prepare_case(case, params, None, str(tmp_path))
    image = direct.slices[0].image
    assert (image == 0).any() and (image == 7).any()
    for a, b in zip(direct.slices, spilled.slices):
        np.testing.assert_array_equal(a.image, b.image)
