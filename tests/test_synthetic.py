"""Tests of the synthetic BreastDCEDL-format cohort (data_prep.synthetic)."""

from __future__ import annotations

import csv
import dataclasses
import pathlib

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from sklearn.metrics import roc_auc_score

from data_prep import synthetic

SIZE, SLICES, PATIENTS, SEED = 64, 16, 9, 3


def read_rows(csv_path: pathlib.Path) -> list[dict[str, str]]:
    with open(csv_path, newline="") as handle:
        return list(csv.DictReader(handle))


def dce_and_mask(root: pathlib.Path,
                 row: dict[str, str]) -> tuple[list[pathlib.Path], pathlib.Path]:
    return synthetic.image_paths(root, row["pid"], row["dataset"], int(row["n_times"]))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("cohort")
    synthetic.generate_cohort(root, PATIENTS, SEED, SIZE, SLICES, progress=False)
    return root


@pytest.fixture(scope="module")
def rows(cohort) -> list[dict[str, str]]:
    return read_rows(cohort / "metadata.csv")


def test_metadata_columns_in_order(cohort):
    with open(cohort / "metadata.csv", newline="") as handle:
        header = next(csv.reader(handle))
    assert header == list(synthetic.METADATA_COLUMNS)
    assert len(header) == 29
    assert header[0] == "pid" and header[-2:] == ["dataset", "test"]


def test_metadata_values(rows):
    assert len(rows) == PATIENTS
    assert len({r["pid"] for r in rows}) == PATIENTS
    for r in rows:
        site = synthetic.SITES[r["dataset"]]
        n_times = int(r["n_times"])
        assert r["pid"].startswith(f"SYN-{site.letter}-")
        assert (r["n_xy"], r["n_z"]) == (str(SIZE), str(SLICES))
        assert n_times == len(site.times_s) and 4 <= n_times <= 6
        assert (r["pre"], r["post_early"], r["post_late"]) == ("0", str(site.post_early),
                                                               str(n_times - 1))
        assert r["post_early"] in ("1", "2")
        assert 2.0 <= float(r["slice_thick"]) <= 3.0
        assert 0.6 <= float(r["xy_spacing"]) * SIZE / 384 <= 0.9
        assert 25 <= int(r["age"]) <= 75
        assert r["test"] in ("0", "1", "2")
        assert int(r["race_white"]) + int(r["race_black"]) <= 1


def test_files_named_per_site(cohort, rows):
    assert {r["dataset"] for r in rows} == set(synthetic.SITES)
    for r in rows:
        pid, n_times = r["pid"], int(r["n_times"])
        if r["dataset"] == "synthetic_a":
            expected = [f"{pid}_spy1_vis1_acq{t}.nii.gz" for t in range(n_times)]
            mask = f"{pid}_spy1_vis1_mask.nii.gz"
        else:
            expected = [f"{pid}_spy2_vis1_dce_aqc_{t}.nii.gz" for t in range(n_times)]
            mask = f"{pid}_spy2_vis1_mask.nii.gz"
        assert sorted(p.name for p in (cohort / "dce").glob(f"{pid}_*")) == sorted(expected)
        assert (cohort / "mask" / mask).is_file()
    assert len(list((cohort / "mask").iterdir())) == PATIENTS


def test_zyx_identity_affine_trap(cohort, rows):
    row = rows[0]
    dce_paths, mask_path = dce_and_mask(cohort, row)
    img = nib.load(dce_paths[int(row["post_early"])])
    assert img.shape == (SLICES, SIZE, SIZE)
    np.testing.assert_array_equal(img.affine, np.eye(4))
    assert img.header.get_zooms() == (1.0, 1.0, 1.0)
    assert img.get_data_dtype() == np.float32
    data = img.get_fdata()
    assert data.min() >= 0 and data.max() <= 65535
    np.testing.assert_array_equal(data, np.rint(data))

    itk_array = sitk.GetArrayFromImage(sitk.ReadImage(str(dce_paths[0])))
    assert itk_array.shape == (SIZE, SIZE, SLICES)
    np.testing.assert_array_equal(itk_array, nib.load(dce_paths[0]).get_fdata().transpose(2, 1, 0))

    mask_img = nib.load(mask_path)
    assert mask_img.get_data_dtype() == np.int32
    assert mask_img.shape == (SLICES, SIZE, SIZE)
    assert set(np.unique(np.asarray(mask_img.dataobj))) == {0, 1}


def test_mask_extent_matches_csv(cohort, rows):
    for r in rows:
        mask = np.asarray(nib.load(dce_and_mask(cohort, r)[1]).dataobj)
        z, y, x = np.nonzero(mask)
        assert (z.min(), z.max()) == (int(r["mask_start"]), int(r["mask_end"]))
        assert (y.min(), y.max()) == (int(r["sraw"]), int(r["eraw"]))
        assert (x.min(), x.max()) == (int(r["scol"]), int(r["ecol"]))
        assert mask.sum() == int(r["tum_vol"])
        assert int(r["mask_end"]) - int(r["mask_start"]) >= 2


def test_same_seed_same_arrays_other_seed_differs(cohort, rows, tmp_path):
    again = tmp_path / "again"
    other = tmp_path / "other"
    synthetic.generate_cohort(again, PATIENTS, SEED, SIZE, SLICES, progress=False)
    synthetic.generate_cohort(other, PATIENTS, SEED + 1, SIZE, SLICES, progress=False)
    assert (cohort / "metadata.csv").read_bytes() == (again / "metadata.csv").read_bytes()
    for r in rows:
        for path in dce_and_mask(cohort, r)[0] + [dce_and_mask(cohort, r)[1]]:
            twin = again / path.relative_to(cohort)
            np.testing.assert_array_equal(nib.load(path).get_fdata(), nib.load(twin).get_fdata())
    other_rows = read_rows(other / "metadata.csv")
    assert [r["pid"][-4:] for r in other_rows] == [r["pid"][-4:] for r in rows]
    for mine, theirs in zip(rows, other_rows):
        a = nib.load(dce_and_mask(cohort, mine)[0][0]).get_fdata()
        b = nib.load(dce_and_mask(other, theirs)[0][0]).get_fdata()
        assert not np.array_equal(a, b)


def test_generate_patient_deterministic_in_memory():
    one = synthetic.generate_patient(7, 4, 1, "synthetic_b", SIZE, SLICES)
    two = synthetic.generate_patient(7, 4, 1, "synthetic_b", SIZE, SLICES)
    three = synthetic.generate_patient(8, 4, 1, "synthetic_b", SIZE, SLICES)
    np.testing.assert_array_equal(one.phases, two.phases)
    np.testing.assert_array_equal(one.mask, two.mask)
    assert one.row == two.row
    assert not np.array_equal(one.phases, three.phases)
    assert one.phases.shape == (6, SLICES, SIZE, SIZE) and one.phases.dtype == np.float32
    assert one.mask.shape == (SLICES, SIZE, SIZE) and one.mask.dtype == np.int32


@pytest.mark.parametrize("n", [1, 4, 9, 10, 20, 40, 41, 103])
def test_prevalence_exact(n):
    plans = synthetic.plan_cohort(n, seed=11)
    assert sum(p.her2 for p in plans) == round(0.25 * n)
    assert [p.index for p in plans] == list(range(n))


def test_labels_shuffled_by_seed():
    labels = {tuple(p.her2 for p in synthetic.plan_cohort(40, seed)) for seed in range(5)}
    assert len(labels) > 1


@pytest.mark.parametrize("n", [20, 40, 100])
def test_splits_stratified(n):
    plans = synthetic.plan_cohort(n, seed=2)
    for split in (0, 1, 2):
        assert any(p.her2 for p in plans if p.split == split)
    fractions = [sum(p.split == s for p in plans) / n for s in (0, 1, 2)]
    assert fractions[0] == pytest.approx(0.70, abs=0.06)
    assert fractions[1] == pytest.approx(0.15, abs=0.05)
    assert fractions[2] == pytest.approx(0.15, abs=0.05)


def test_written_prevalence_and_ground_truth(cohort, rows):
    assert sum(int(r["HER2"]) for r in rows) == round(0.25 * PATIENTS)
    truth = {r["pid"]: r for r in read_rows(cohort / "ground_truth.csv")}
    assert set(truth) == {r["pid"] for r in rows}
    for r in rows:
        assert truth[r["pid"]]["HER2"] == r["HER2"]
        assert truth[r["pid"]]["site"] == r["dataset"]
        assert "washin_rate" in truth[r["pid"]] and "oracle_score" in truth[r["pid"]]


def check_leakage(row: dict) -> None:
    her2, hr = int(row["HER2"]), int(row["HR"])
    assert int(row["HER2pos"]) == her2
    assert int(row["HRposHER2neg"]) == int(hr == 1 and her2 == 0)
    assert int(row["TripleNeg"]) == int(hr == 0 and her2 == 0)
    expected = "HER2+" if her2 else ("HR+HER2-" if hr else "TN")
    assert row["HR_HER2_STATUS"] == expected


def test_leakage_columns_consistent(rows):
    for r in rows:
        check_leakage(r)
    rng = np.random.default_rng(0)
    draws = [synthetic.sample_clinical(int(i % 4 == 0), rng) for i in range(400)]
    for d in draws:
        check_leakage(d)
    assert {d["HR_HER2_STATUS"] for d in draws} == {"HER2+", "HR+HER2-", "TN"}
    assert 0.5 < np.mean([d["HR"] for d in draws]) < 0.7
    assert 0.2 < np.mean([d["pCR"] for d in draws]) < 0.4


def test_artefacts_far_above_tissue_percentile():
    for index, site in enumerate(synthetic.SITES):
        patient = synthetic.generate_patient(1, index, 0, site, SIZE, SLICES)
        params = patient.params
        for volume in patient.phases[:1]:
            tissue = volume[volume > 5 * params.noise_sigma]
            p99 = np.percentile(tissue, 99)
            assert np.sum(volume > 3 * p99) >= params.n_artefacts
            assert volume.max() >= 5 * params.tissue_level * 0.99
            assert volume.max() <= 31 * params.tissue_level
        late = patient.phases[-1]
        assert late.max() > 2 * np.percentile(late[late > 5 * params.noise_sigma], 99)


def test_sites_differ_in_intensity_scale():
    levels = {}
    for site in synthetic.SITES:
        medians = []
        for index in range(2):
            pre = synthetic.generate_patient(0, index, 0, site, SIZE, SLICES).phases[0]
            medians.append(np.median(pre[pre > np.percentile(pre, 60)]))
        levels[site] = float(np.mean(medians))
    assert levels["synthetic_b"] > 2 * levels["synthetic_a"]
    assert levels["synthetic_a"] > 2 * levels["synthetic_c"]


def test_bias_field_is_smooth_and_substantial():
    rng = synthetic.patient_rng(0, 0)
    params = synthetic.sample_planted_params(0, "synthetic_a", rng)
    state = rng.bit_generator.state
    biased, _ = synthetic.render_patient(params, SIZE, SLICES, rng)
    rng.bit_generator.state = state
    flat, _ = synthetic.render_patient(dataclasses.replace(params, bias_amplitude=0.0), SIZE,
                                       SLICES, rng)
    tissue = flat[0] > 0.5 * params.tissue_level
    ratio = biased[0][tissue] / flat[0][tissue]
    low, high = np.percentile(ratio, [2, 98])
    assert high - low > 0.2
    assert low > 1 / (1.0 + params.bias_amplitude) - 0.05
    assert high < 1.0 + params.bias_amplitude + 0.05


def test_image_kinetics_differ_by_label_in_planted_direction():
    sites = list(synthetic.SITES)
    ratio = {0: [], 1: []}
    for index in range(24):
        her2 = index % 2
        patient = synthetic.generate_patient(5, index, her2, sites[index % 3], SIZE, SLICES)
        inside = patient.mask.astype(bool)
        early = patient.phases[patient.row["post_early"]][inside].mean()
        late = patient.phases[patient.row["post_late"]][inside].mean()
        ratio[her2].append(early / late)
    assert np.mean(ratio[1]) > np.mean(ratio[0])
    labels = [0] * len(ratio[0]) + [1] * len(ratio[1])
    assert roc_auc_score(labels, ratio[0] + ratio[1]) > 0.7


def test_oracle_auc_in_documented_range():
    rng = np.random.default_rng(0)
    sites = list(synthetic.SITES)
    labels = [1] * 1000 + [0] * 3000
    scores = [synthetic.oracle_score(synthetic.sample_planted_params(y, sites[i % 3], rng))
              for i, y in enumerate(labels)]
    auc = roc_auc_score(labels, scores)
    assert 0.88 <= synthetic.ORACLE_AUC <= 0.95
    assert 0.88 <= auc <= 0.95
    assert auc == pytest.approx(synthetic.ORACLE_AUC, abs=0.02)


def test_planted_parameters_shift_in_documented_direction():
    rng = np.random.default_rng(9)
    draws = {y: [synthetic.sample_planted_params(y, "synthetic_c", rng) for _ in range(500)]
             for y in (0, 1)}
    for name in ("washin_rate", "washout_rate", "necrotic_fraction"):
        assert np.mean([getattr(p, name) for p in draws[1]]) > np.mean(
            [getattr(p, name) for p in draws[0]])
    assert np.mean([p.tumour_diameter_mm for p in draws[1]]) == pytest.approx(
        np.mean([p.tumour_diameter_mm for p in draws[0]]), rel=0.1)


def test_sample_planted_params_rejects_bad_input():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        synthetic.sample_planted_params(2, "synthetic_a", rng)
    with pytest.raises(ValueError):
        synthetic.sample_planted_params(0, "duke", rng)


def test_cli_writes_cohort(tmp_path, capsys):
    out = tmp_path / "cli"
    assert synthetic.main(["--out", str(out), "--patients", "3", "--seed", "4",
                           "--size", "32", "--slices", "12"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert lines[-1] == str(out / "metadata.csv")
    assert "3 patients" in lines[-2]
    assert "3/3" in captured.err
    rows = read_rows(out / "metadata.csv")
    assert len(rows) == 3 and {r["n_xy"] for r in rows} == {"32"}
    assert nib.load(dce_and_mask(out, rows[0])[0][0]).shape == (12, 32, 32)


@pytest.mark.parametrize("bad", [["--patients", "0"], ["--size", "16"], ["--slices", "11"],
                                 ["--seed", "-1"], ["--patients", "many"]])
def test_cli_rejects_bad_arguments(tmp_path, capsys, bad):
    with pytest.raises(SystemExit) as excinfo:
        synthetic.main(["--out", str(tmp_path / "bad"), *bad])
    assert excinfo.value.code == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_generate_cohort_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="patients"):
        synthetic.generate_cohort(tmp_path, patients=0)
    with pytest.raises(ValueError, match="size"):
        synthetic.generate_cohort(tmp_path, size=31)


def test_cli_summary_gives_the_oracle_auc_of_this_cohort(tmp_path, capsys):
    from sklearn.metrics import roc_auc_score

    from data_prep.synthetic.__main__ import pair_auc

    out = tmp_path / "cli"
    assert synthetic.main(["--out", str(out), "--patients", "12", "--seed", "1",
                           "--size", "32", "--slices", "12"]) == 0
    truth = {r["pid"]: float(r["oracle_score"]) for r in read_rows(out / "ground_truth.csv")}
    rows = read_rows(out / "metadata.csv")
    expected = roc_auc_score([int(r["HER2"]) for r in rows], [truth[r["pid"]] for r in rows])
    assert f"oracle AUC {expected:.3f} on these patients" in capsys.readouterr().out
    rng = np.random.default_rng(0)
    labels, scores = rng.integers(0, 2, 50), rng.integers(0, 5, 50).astype(float)  # many ties
    assert pair_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert pair_auc([1, 1], [0.2, 0.3]) is None
