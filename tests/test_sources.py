"""Tests of the readers (BreastDCEDL, manifest, DICOM) and of the patient-level split rule."""
from __future__ import annotations

import collections
import csv
import dataclasses
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from conftest import COLUMNS_V2, SHAPE, TUMOUR, save_zyx, write_cohort, write_csv
from data_prep import pipeline, splits
from data_prep.errors import BadCaseError
from data_prep.params import PrepParams
from data_prep.sources import Case, list_cases
from data_prep.volumes import read_volume

# real BreastDCEDL I-SPY2 files (CC BY 4.0, see the README beside them), shipped with the tests
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "breastdcedl_ispy2")
FIXTURE_CSV = os.path.join(FIXTURE, "metadata_spy2_vis1_for_modeling.csv")

# the three patients whose real masks are shipped: n_z, mask_start, mask_end (from the CSV/README)
REAL = {"ACRIN-6698-102212": (80, 15, 52), "ACRIN-6698-104268": (80, 36, 60),
        "ISPY2-550421": (160, 58, 123)}
# two patients with an empty `test` in the real CSV (HER2pos 1 and 0); stand-in files only
NO_SPLIT = {"ACRIN-6698-635632": 1, "ISPY2-208265": 0}


def stand_in_dce(mask: np.ndarray, t: int) -> np.ndarray:
    """A float32 (z, y, x) DCE stand-in of the mask's geometry: ramps on all axes + enhancement."""
    z, y, x = np.indices(mask.shape, dtype=np.float32)
    return (200.0 + 3.0 * z + 2.0 * y + x + 400.0 * t * (mask > 0)).astype(np.float32)


def fixture_rows() -> dict[str, dict[str, str]]:
    with open(FIXTURE_CSV, newline="") as handle:
        return {row["pid"]: row for row in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def real_source(tmp_path_factory):
    """The real CSV rows and masks of the 3 shipped patients, stand-in DCE files in their on-disk
    geometry ((z, y, x) written straight into NIfTI, identity affine), and 2 small stand-in
    patients whose official split is empty."""
    folder = tmp_path_factory.mktemp("breastdcedl_real")
    os.makedirs(folder / "mask")
    os.makedirs(folder / "dce")
    keep = set(REAL) | set(NO_SPLIT)
    with open(FIXTURE_CSV, newline="") as handle:
        lines = handle.read().splitlines()
    with open(folder / "metadata_spy2_vis1_for_modeling.csv", "w") as handle:
        handle.write("\n".join([lines[0]] + [ln for ln in lines[1:] if ln.split(",")[0] in keep]))
        handle.write("\n")
    rows = fixture_rows()
    written = {}
    for pid in REAL:
        name = f"{pid}_spy2_vis1_mask.nii.gz"
        shutil.copy(os.path.join(FIXTURE, "mask", name), folder / "mask" / name)
        mask = nib.load(str(folder / "mask" / name)).get_fdata()
        first = None
        for key in ("pre", "post_early", "post_late"):
            t = int(float(rows[pid][key]))
            path = str(folder / "dce" / f"{pid}_spy2_vis1_dce_aqc_{t}.nii.gz")
            if pid == "ACRIN-6698-104268" or first is None:
                written[(pid, t)] = stand_in_dce(mask, t)
                save_zyx(written[(pid, t)], path)
                first = first or (path, written[(pid, t)])
            else:   # the other two patients are only read, not prepared: one file, linked
                os.link(first[0], path)
                written[(pid, t)] = first[1]
    for pid in NO_SPLIT:
        n_z, z0, z1 = (int(float(rows[pid][k])) for k in ("n_z", "mask_start", "mask_end"))
        mask = np.zeros((n_z, 12, 12), np.int32)
        mask[z0:z1 + 1, 3:9, 4:8] = 1
        save_zyx(mask, str(folder / "mask" / f"{pid}_spy2_vis1_mask.nii.gz"))
        for key in ("pre", "post_early", "post_late"):
            t = int(float(rows[pid][key]))
            path = str(folder / "dce" / f"{pid}_spy2_vis1_dce_aqc_{t}.nii.gz")
            save_zyx(stand_in_dce(mask, t), path)
    return str(folder), rows, written


# ---------------------------------------------------------------------------------------------
# BreastDCEDL, first release (25 columns), real files

def test_real_csv_is_the_first_release():
    with open(FIXTURE_CSV, newline="") as handle:
        header = next(csv.reader(handle))
    assert len(header) == 25 and "HER2pos" in header
    assert not {"HER2", "dataset", "sraw", "eraw", "scol", "ecol"} & set(header)


def test_real_masks_read_as_zyx_with_csv_extent(real_source):
    folder, rows, written = real_source
    for pid, (n_z, z0, z1) in REAL.items():
        row = rows[pid]
        assert (int(float(row["n_z"])), int(float(row["mask_start"])),
                int(float(row["mask_end"]))) == (n_z, z0, z1)
        path = os.path.join(folder, "mask", f"{pid}_spy2_vis1_mask.nii.gz")
        volume = read_volume(pid, path, stored_zyx=True)
        reference = nib.load(path).get_fdata()
        assert volume.array.shape == (n_z, 256, 256) == reference.shape
        np.testing.assert_array_equal(volume.array, reference)
        z = np.nonzero(volume.array.any(axis=(1, 2)))[0]
        assert (z[0], z[-1]) == (z0, z1)
        assert set(np.unique(volume.array)) == {0, 1}
        # the trap itself: read plainly, the slice axis comes out last
        assert sitk.GetArrayFromImage(sitk.ReadImage(path)).shape == (256, 256, n_z)
        # stand-in DCE phases in the same geometry read back exactly as written
        t = int(float(row["post_late"]))
        dce = read_volume(pid, os.path.join(folder, "dce", f"{pid}_spy2_vis1_dce_aqc_{t}.nii.gz"),
                          stored_zyx=True)
        np.testing.assert_array_equal(dce.array, written[(pid, t)])


def test_real_csv_labels_splits_spacing(real_source):
    folder, rows, _ = real_source
    listing = list_cases(folder, PrepParams())
    assert listing.kind == "breastdcedl"
    assert listing.problems == []
    cases = {c.patient_id: c for c in listing.cases}
    assert set(cases) == set(REAL) | set(NO_SPLIT)
    official = {"0.0": "train", "1.0": "test", "2.0": "validation", "": "train"}
    for pid, case in cases.items():
        row = rows[pid]
        assert case.label == int(row["HER2pos"])       # the first release's label column
        assert case.split == official[row["test"]]
        assert case.cohort == "spy2"
        assert case.stored_zyx
        names = [os.path.basename(p) for p in case.phases]
        assert names == [f"{pid}_spy2_vis1_dce_aqc_{int(float(row[k]))}.nii.gz"
                         for k in ("pre", "post_early", "post_late")]
        assert os.path.basename(case.mask) == f"{pid}_spy2_vis1_mask.nii.gz"
    assert cases["ACRIN-6698-635632"].label == 1
    # 208265 has pCR = 1 and TripleNeg = 1 but HER2pos = 0: no lookalike column gives the label
    assert (rows["ISPY2-208265"]["pCR"], rows["ISPY2-208265"]["TripleNeg"]) == ("1", "1")
    assert cases["ISPY2-208265"].label == 0
    assert cases["ACRIN-6698-102212"].split == "test"
    # patients with an empty `test` go to train, and a note says how many
    assert {pid for pid, row in rows.items() if pid in cases and row["test"] == ""} == set(NO_SPLIT)
    assert all(cases[pid].split == "train" for pid in NO_SPLIT)
    split_notes = [note for note in listing.notes if "official split" in note]
    assert len(split_notes) == 1
    assert "2 patients" in split_notes[0] and "train" in split_notes[0]
    # 208265 really has an empty xy_spacing in the CSV: noted, not silently 1 mm
    assert any("ISPY2-208265" in note and "xy_spacing" in note for note in listing.notes)
    # the real spacing comes from the CSV, not the 1 mm header
    for pid in REAL:
        xy, thick = float(rows[pid]["xy_spacing"]), float(rows[pid]["slice_thick"])
        assert cases[pid].spacing == (thick, xy, xy)
    assert cases["ACRIN-6698-102212"].spacing == (2.0, 0.6055, 0.6055)
    assert cases["ISPY2-550421"].spacing == (1.0, 0.6880733967, 0.6880733967)


def test_real_patient_loads_and_prepares(real_source):
    folder, rows, written = real_source
    case = {c.patient_id: c for c in list_cases(folder, PrepParams()).cases}["ACRIN-6698-104268"]
    params = PrepParams(image_size=16, slices_per_patient=4)
    loaded = pipeline.load_case(case, params)
    # header spacing is (1, 1, 1); the CSV says 2.0 mm slices, 0.703125 mm pixels
    header = sitk.ReadImage(case.phases[0]).GetSpacing()
    assert header == (1.0, 1.0, 1.0)
    assert loaded.spacing == (2.0, 0.703125, 0.703125)
    expected = np.stack([written[("ACRIN-6698-104268", t)] for t in (0, 2, 6)])
    np.testing.assert_array_equal(loaded.phases, expected)
    reference_mask = nib.load(case.mask).get_fdata()
    np.testing.assert_array_equal(loaded.mask, reference_mask)
    ys, xs = np.nonzero(reference_mask.any(axis=0))
    assert loaded.tumour_box == (36, 60, ys.min(), ys.max(), xs.min(), xs.max())
    prepared = pipeline.prepare_case(case, params)
    # central 4 of the 25 tumour slices 36..60: 46..49
    assert [s.slice_index for s in prepared.slices] == [46, 47, 48, 49]
    for item in prepared.slices:
        assert item.image.shape == (16, 16, 3) and item.image.dtype == np.uint8
        assert item.mask.shape == (16, 16, 1) and item.mask.any()


def test_whole_real_csv_parses(tmp_path, real_source):
    """All 982 rows of the real CSV parse; only the missing files are reported, one per patient."""
    folder, rows, _ = real_source
    shutil.copy(FIXTURE_CSV, tmp_path / "metadata.csv")
    shutil.copytree(os.path.join(folder, "mask"), tmp_path / "mask")
    shutil.copytree(os.path.join(folder, "dce"), tmp_path / "dce")
    listing = list_cases(str(tmp_path), PrepParams())
    assert {c.patient_id for c in listing.cases} == set(REAL) | set(NO_SPLIT)
    assert len(listing.problems) == len(rows) - len(listing.cases) == 977
    assert all(p.reason.startswith("missing phase file") for p in listing.problems)
    assert {p.patient_id for p in listing.problems} == set(rows) - set(REAL) - set(NO_SPLIT)


# ---------------------------------------------------------------------------------------------
# BreastDCEDL, later release (29 columns), Duke and I-SPY1 naming, --phases

def test_later_release_label_dataset_and_split(cohort):
    folder, rows = cohort
    # make HER2pos disagree with HER2: the later release's label column is HER2
    for row in rows:
        row["HER2pos"] = 1 - int(row["HER2"])
    write_csv(os.path.join(folder, "metadata.csv"), rows, list(rows[0]))
    listing = list_cases(folder, PrepParams())
    assert listing.problems == [] and listing.notes == []
    cases = {c.patient_id: c for c in listing.cases}
    assert set(cases) == {row["pid"] for row in rows}
    official = {0: "train", 1: "test", 2: "validation"}
    for row in rows:
        case = cases[row["pid"]]
        assert case.label == int(row["HER2"])
        assert case.split == official[row["test"]]
        assert case.cohort == "spy2"
        assert case.spacing == (2.5, 0.7, 0.7)
    assert cases["T-004"].split == "test" and cases["T-005"].split == "validation"


def add_duke_patient(folder: str, rows: list[dict], pid: str = "D-001", times: int = 3):
    """A Duke patient: `<pid>_duke_aqc_<t>.nii.gz`, no mask file, tumour box in the CSV."""
    rng = np.random.default_rng(7)
    inside = np.zeros(SHAPE, bool)
    inside[2:8, 10:21, 12:20] = True                      # box z 2..7, y 10..20, x 12..19
    arrays = []
    for t in range(times):
        array = (rng.uniform(100, 300, SHAPE) + 300.0 * t * inside).astype(np.float32)
        save_zyx(array, os.path.join(folder, "dce", f"{pid}_duke_aqc_{t}.nii.gz"))
        arrays.append(array)
    row = dict(rows[0])
    row.update(pid=pid, n_times=times, pre=0, post_early=1, post_late=2, mask_start=2,
               mask_end=7, sraw=10, eraw=20, scol=12, ecol=19, HER2=1, HER2pos=1,
               dataset="duke", test=0)
    rows.append(row)
    write_csv(os.path.join(folder, "metadata.csv"), rows, list(rows[0]))
    return arrays


def test_duke_patient_box_and_zero_mask(cohort):
    folder, rows = cohort
    arrays = add_duke_patient(folder, rows)
    listing = list_cases(folder, PrepParams())
    assert listing.problems == []
    case = {c.patient_id: c for c in listing.cases}["D-001"]
    assert case.mask is None
    assert case.box == (2, 7, 10, 20, 12, 19)
    assert case.cohort == "duke" and case.label == 1 and case.split == "train"
    assert [os.path.basename(p) for p in case.phases] == [f"D-001_duke_aqc_{t}.nii.gz"
                                                          for t in (0, 1, 2)]
    # box 11 x 8 in-plane, margin 0.25 -> square side round(11 * 1.5) = 16 (17 rounds to 16 below)
    side = round(11 * 1.5)
    params = PrepParams(normalization="global_minmax", image_size=side, slices_per_patient=2)
    prepared = pipeline.prepare_case(case, params)
    assert [s.slice_index for s in prepared.slices] == [4, 5]     # central 2 of 2..7
    phases = np.stack(arrays).astype(np.float64)
    eight_bit = np.rint(255 * (phases - phases.min()) / (phases.max() - phases.min()))
    # centred on the box: y centre (10 + 20 + 1) / 2 = 15.5, x centre (12 + 19 + 1) / 2 = 16
    top, left = int(round(15.5 - side / 2)), int(round(16 - side / 2))
    assert top <= 10 and top + side - 1 >= 20 and left <= 12 and left + side - 1 >= 19
    for item in prepared.slices:
        assert not item.mask.any()                                # no mask: zeros
        assert item.mask.shape == (side, side, 1)
        expected = np.moveaxis(eight_bit[:, item.slice_index, top:top + side, left:left + side],
                               0, -1)
        np.testing.assert_array_equal(item.image, expected.astype(np.uint8))


def test_duke_box_outside_volume_is_a_bad_case(cohort):
    folder, rows = cohort
    add_duke_patient(folder, rows)
    rows[-1]["eraw"] = SHAPE[1] + 5
    write_csv(os.path.join(folder, "metadata.csv"), rows, list(rows[0]))
    case = {c.patient_id: c for c in list_cases(folder, PrepParams()).cases}["D-001"]
    with pytest.raises(BadCaseError, match="outside the volume"):
        pipeline.load_case(case, PrepParams())


@pytest.mark.parametrize("column, value", [("mask_end", 1), ("eraw", 5), ("ecol", 11),
                                           ("sraw", -1)])
def test_duke_invalid_box_is_reported(cohort, column, value):
    """A reversed or negative box would silently give no slices or wrap around: it is rejected."""
    folder, rows = cohort
    add_duke_patient(folder, rows)
    rows[-1][column] = value
    write_csv(os.path.join(folder, "metadata.csv"), rows, list(rows[0]))
    listing = list_cases(folder, PrepParams())
    assert "D-001" not in {c.patient_id for c in listing.cases}
    (problem,) = listing.problems
    assert problem.patient_id == "D-001" and "box" in problem.reason


def test_ispy1_naming(tmp_path):
    """I-SPY1 files (`_spy1_vis1_acq<t>`), and a CSV without `dataset`: naming found from files."""
    folder = tmp_path / "spy1"
    os.makedirs(folder / "nested" / "deeper")
    rng = np.random.default_rng(2)
    mask = np.zeros(SHAPE, np.int32)
    mask[TUMOUR] = 1
    arrays = {}
    for t in range(3):
        arrays[t] = (rng.uniform(50, 150, SHAPE) + 100.0 * t * mask).astype(np.float32)
        save_zyx(arrays[t], str(folder / "nested" / f"S1-01_spy1_vis1_acq{t}.nii.gz"))
    save_zyx(mask, str(folder / "nested" / "deeper" / "S1-01_spy1_vis1_mask.nii.gz"))
    columns = ["pid", "n_times", "pre", "post_early", "post_late", "slice_thick", "xy_spacing",
               "HER2pos", "test"]
    write_csv(str(folder / "meta.csv"), [dict(pid="S1-01", n_times=3, pre="0.0", post_early="1.0",
                                              post_late="2.0", slice_thick=1.5, xy_spacing=0.9,
                                              HER2pos=1, test="2.0")], columns)
    listing = list_cases(str(folder), PrepParams())
    assert listing.problems == []
    (case,) = listing.cases
    assert case.cohort == "spy1" and case.label == 1 and case.split == "validation"
    assert [os.path.basename(p) for p in case.phases] == [f"S1-01_spy1_vis1_acq{t}.nii.gz"
                                                          for t in range(3)]
    assert case.mask.endswith(os.path.join("deeper", "S1-01_spy1_vis1_mask.nii.gz"))
    loaded = pipeline.load_case(case, PrepParams())
    np.testing.assert_array_equal(loaded.phases, np.stack([arrays[t] for t in range(3)]))
    np.testing.assert_array_equal(loaded.mask, mask)
    assert loaded.spacing == (1.5, 0.9, 0.9)


def tumour_enhancement(loaded) -> list[float]:
    inside = loaded.mask.astype(bool)
    return [float(p[inside].mean() - p[~inside].mean()) for p in loaded.phases]


def test_phases_override(cohort):
    folder, _ = cohort                           # 4 time points; tumour = +250 * t
    default = {c.patient_id: c for c in list_cases(folder, PrepParams()).cases}["T-000"]
    assert [p[-9:] for p in default.phases] == ["_0.nii.gz", "_1.nii.gz", "_3.nii.gz"]
    np.testing.assert_allclose(tumour_enhancement(pipeline.load_case(default, PrepParams())),
                               [0, 250, 750], atol=15)
    params = PrepParams(phases=(1, 2, 3))
    listing = list_cases(folder, params)
    assert listing.problems == []
    case = {c.patient_id: c for c in listing.cases}["T-000"]
    assert [p[-9:] for p in case.phases] == ["_1.nii.gz", "_2.nii.gz", "_3.nii.gz"]
    np.testing.assert_allclose(tumour_enhancement(pipeline.load_case(case, params)),
                               [250, 500, 750], atol=15)


def test_phases_override_out_of_range_is_reported(cohort):
    folder, rows = cohort
    listing = list_cases(folder, PrepParams(phases=(0, 1, 4)))
    assert listing.cases == []
    assert len(listing.problems) == len(rows)
    assert all("out of range" in p.reason and "late=4" in p.reason for p in listing.problems)


def test_phases_command_line():
    from data_prep import prepare
    args = prepare.parse_args(["--source", "s", "--data_dir", "d", "--phases", "1,2,4"])
    assert args.phases == (1, 2, 4)


def test_missing_mask_and_phase_files_are_reported(cohort):
    folder, rows = cohort
    os.remove(os.path.join(folder, "mask", "T-001_spy2_vis1_mask.nii.gz"))
    os.remove(os.path.join(folder, "dce", "T-002_spy2_vis1_dce_aqc_3.nii.gz"))
    listing = list_cases(folder, PrepParams())
    problems = {p.patient_id: p for p in listing.problems}
    assert set(problems) == {"T-001", "T-002"}
    assert "mask" in problems["T-001"].reason
    assert problems["T-002"].reason.startswith("missing phase file")
    assert problems["T-002"].path == "T-002_spy2_vis1_dce_aqc_3.nii.gz"
    assert len(listing.cases) == len(rows) - 2


# ---------------------------------------------------------------------------------------------
# Manifest: NIfTI written normally (no axis trap), relative paths, box, split, cohort, external

def write_nifti(array: np.ndarray, path: str, spacing_zyx=(1.0, 1.0, 1.0)) -> None:
    """A (z, y, x) array written the usual way: SimpleITK's (x, y, z) image of it, real spacing."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    sitk.WriteImage(image, path)


MANIFEST_COLUMNS = ["patient_id", "label", "pre", "early", "late", "mask", "box", "split", "cohort"]


@pytest.fixture
def manifest_source(tmp_path):
    folder = tmp_path / "site"
    rng = np.random.default_rng(11)
    shape, spacing = (6, 14, 18), (3.0, 0.8, 0.7)
    arrays, rows = {}, []
    for i, (label, split, cohort, use_box) in enumerate([
            ("HER2+", "train", "siteA", False), ("0", "external", "siteB", True),
            ("1", "", "", False), ("negative", "test", "siteA", True)]):
        pid = f"M-{i}"
        mask = np.zeros(shape, np.uint8)
        mask[1:5, 3:10, 4:12] = 1
        arrays[pid] = [(rng.uniform(0, 100, shape) + 50.0 * t * mask).astype(np.float32)
                       for t in range(3)]
        row = dict(patient_id=pid, label=label, split=split, cohort=cohort, mask="", box="")
        for key, array in zip(("pre", "early", "late"), arrays[pid]):
            write_nifti(array, str(folder / pid / f"{key}.nii.gz"), spacing)
            row[key] = f"{pid}/{key}.nii.gz"                      # relative to the manifest
        if use_box:
            row["box"] = "1 4 3 9 4 11"
        else:
            write_nifti(mask, str(folder / pid / "mask.nii.gz"), spacing)
            row["mask"] = f"{pid}/mask.nii.gz"
        arrays[pid].append(mask)
        rows.append(row)
    write_csv(str(folder / "manifest.csv"), rows, MANIFEST_COLUMNS)
    return str(folder), arrays, spacing


def test_manifest_listing(manifest_source, tmp_path):
    folder, arrays, _ = manifest_source
    # the folder holding manifest.csv, and the CSV itself, from another working directory
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for source in (folder, os.path.join(folder, "manifest.csv")):
            listing = list_cases(source, PrepParams())
            assert listing.kind == "manifest" and listing.problems == []
            cases = {c.patient_id: c for c in listing.cases}
            assert [cases[p].label for p in sorted(cases)] == [1, 0, 1, 0]
            assert [cases[p].split for p in sorted(cases)] == ["train", "external", None, "test"]
            assert [cases[p].cohort for p in sorted(cases)] == ["siteA", "siteB", "manifest",
                                                                "siteA"]
            assert cases["M-0"].phases == tuple(os.path.join(folder, "M-0", f"{k}.nii.gz")
                                                for k in ("pre", "early", "late"))
            assert cases["M-0"].mask == os.path.join(folder, "M-0", "mask.nii.gz")
            assert cases["M-1"].mask is None and cases["M-1"].box == (1, 4, 3, 9, 4, 11)
            assert not any(c.stored_zyx for c in cases.values())
            assert all(c.spacing is None for c in cases.values())
    finally:
        os.chdir(cwd)


def test_manifest_reads_header_geometry(manifest_source):
    folder, arrays, spacing = manifest_source
    cases = {c.patient_id: c for c in list_cases(folder, PrepParams()).cases}
    loaded = pipeline.load_case(cases["M-0"], PrepParams())
    np.testing.assert_array_equal(loaded.phases, np.stack(arrays["M-0"][:3]))
    np.testing.assert_array_equal(loaded.mask, arrays["M-0"][3])
    np.testing.assert_allclose(loaded.spacing, spacing, rtol=1e-6)   # float32 in the header
    assert loaded.tumour_box == (1, 4, 3, 9, 4, 11)
    boxed = pipeline.load_case(cases["M-1"], PrepParams())
    np.testing.assert_array_equal(boxed.phases, np.stack(arrays["M-1"][:3]))
    assert not boxed.mask.any() and boxed.mask.shape == (6, 14, 18)
    assert boxed.tumour_box == (1, 4, 3, 9, 4, 11)


def test_manifest_splits_and_external(manifest_source):
    folder, _, _ = manifest_source
    params = PrepParams()
    by_split = splits.assign(list_cases(folder, params).cases, params)
    assert sum(len(group) for group in by_split.values()) == 4
    assert {c.patient_id for c in by_split["external"]} == {"M-1"}
    assert "M-0" in {c.patient_id for c in by_split["train"]}
    assert "M-3" in {c.patient_id for c in by_split["test"]}
    # the whole source as an external set
    params = PrepParams(external="AMBL")
    listing = list_cases(folder, params)
    assert len(listing.cases) == 4
    assert all(c.split == "external" and c.cohort == "AMBL" for c in listing.cases)
    by_split = splits.assign(listing.cases, params)
    assert len(by_split["external"]) == 4
    assert not by_split["train"] and not by_split["validation"] and not by_split["test"]


def test_manifest_problems(tmp_path):
    folder = tmp_path / "bad"
    array = np.random.default_rng(0).uniform(1, 9, (4, 8, 8)).astype(np.float32)
    write_nifti(array, str(folder / "a.nii.gz"))
    rows = [
        dict(patient_id="ok", label="1", pre="a.nii.gz", early="a.nii.gz", late="a.nii.gz",
             box="0 1 0 1 0 1"),
        dict(patient_id="nofile", label="1", pre="a.nii.gz", early="gone.nii.gz",
             late="a.nii.gz", box="0 1 0 1 0 1"),
        dict(patient_id="badlabel", label="2", pre="a.nii.gz", early="a.nii.gz",
             late="a.nii.gz", box="0 1 0 1 0 1"),
        dict(patient_id="badbox", label="0", pre="a.nii.gz", early="a.nii.gz",
             late="a.nii.gz", box="3 1 0 1 0 1"),
        dict(patient_id="badsplit", label="0", pre="a.nii.gz", early="a.nii.gz",
             late="a.nii.gz", box="0 1 0 1 0 1", split="holdout"),
    ]
    write_csv(str(folder / "manifest.csv"), rows, MANIFEST_COLUMNS)
    listing = list_cases(str(folder), PrepParams())
    assert [c.patient_id for c in listing.cases] == ["ok"]
    problems = {p.patient_id: p for p in listing.problems}
    assert set(problems) == {"nofile", "badlabel", "badbox", "badsplit"}
    assert problems["nofile"].path == os.path.join(str(folder), "gone.nii.gz")
    assert "label" in problems["badlabel"].reason
    assert "box" in problems["badbox"].reason
    assert "split" in problems["badsplit"].reason


# ---------------------------------------------------------------------------------------------
# DICOM series (one folder per phase)

def write_dicom_series(array: np.ndarray, folder: str, spacing_zyx, series_uid: str) -> None:
    """One DICOM file per slice of a (z, y, x) int16 array; files named in reverse slice order,
    so only the Image Position Patient tag gives the order."""
    os.makedirs(folder, exist_ok=True)
    sz, sy, sx = spacing_zyx
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(array.shape[0]):
        image = sitk.GetImageFromArray(array[k].astype(np.int16))
        image.SetSpacing((sx, sy))
        tags = {"0008|0060": "MR", "0020|000d": series_uid + ".0", "0020|000e": series_uid,
                "0008|0018": f"{series_uid}.{k + 1}", "0020|0013": str(k + 1),
                "0020|0032": f"0\\0\\{k * sz}", "0020|0037": "1\\0\\0\\0\\1\\0",
                "0018|0050": str(sz), "0028|0030": f"{sy}\\{sx}"}
        for tag, value in tags.items():
            image.SetMetaData(tag, value)
        writer.SetFileName(os.path.join(folder, f"IM{array.shape[0] - k:04d}.dcm"))
        writer.Execute(image)


def test_dicom_series_manifest(tmp_path):
    folder = tmp_path / "dicom_site"
    rng = np.random.default_rng(5)
    shape, spacing = (5, 12, 10), (3.0, 0.8, 0.7)
    mask = np.zeros(shape, np.uint8)
    mask[1:4, 2:8, 3:7] = 1
    written = []
    for t, key in enumerate(("pre", "early", "late")):
        array = (rng.integers(0, 1500, shape) + 400 * t * mask.astype(np.int64)).astype(np.int16)
        write_dicom_series(array, str(folder / "P1" / key), spacing,
                           f"1.2.826.0.1.3680043.2.1125.77.{t + 1}")
        written.append(array)
    write_nifti(mask, str(folder / "P1" / "mask.nii.gz"), spacing)
    write_csv(str(folder / "manifest.csv"),
              [dict(patient_id="P1", label="1", pre="P1/pre", early="P1/early", late="P1/late",
                    mask="P1/mask.nii.gz")], MANIFEST_COLUMNS)
    (case,) = list_cases(str(folder), PrepParams()).cases
    for key, array in zip(("pre", "early", "late"), written):
        volume = read_volume("P1", str(folder / "P1" / key))
        assert volume.array.shape == shape
        np.testing.assert_array_equal(volume.array, array)
        np.testing.assert_allclose(volume.spacing, spacing)
    loaded = pipeline.load_case(case, PrepParams())
    np.testing.assert_array_equal(loaded.phases, np.stack(written).astype(np.float32))
    np.testing.assert_array_equal(loaded.mask, mask)
    np.testing.assert_allclose(loaded.spacing, spacing)
    assert loaded.tumour_box == (1, 3, 2, 7, 3, 6)
    prepared = pipeline.prepare_case(case, PrepParams(image_size=16, slices_per_patient=0))
    assert [s.slice_index for s in prepared.slices] == [1, 2, 3]


def test_dicom_folder_without_series_names_the_folder(tmp_path):
    empty = tmp_path / "no_dicom_here"
    os.makedirs(empty)
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(BadCaseError) as raised:
        read_volume("P9", str(empty))
    assert raised.value.patient_id == "P9"
    assert raised.value.path == str(empty)
    assert str(empty) in str(raised.value) and "DICOM" in str(raised.value)

    # through a manifest: the late phase points at the empty folder
    array = np.random.default_rng(1).uniform(1, 9, (4, 8, 8)).astype(np.float32)
    write_nifti(array, str(tmp_path / "pre.nii.gz"))
    write_csv(str(tmp_path / "manifest.csv"),
              [dict(patient_id="P9", label="0", pre="pre.nii.gz", early="pre.nii.gz",
                    late="no_dicom_here", box="0 1 0 1 0 1")], MANIFEST_COLUMNS)
    (case,) = list_cases(str(tmp_path / "manifest.csv"), PrepParams()).cases
    with pytest.raises(BadCaseError, match="no_dicom_here"):
        pipeline.load_case(case, PrepParams())


def test_dicom_folder_with_two_series_is_rejected(tmp_path):
    folder = tmp_path / "mixed"
    array = np.ones((3, 6, 6), np.int16)
    array[0, 0, 0] = 5
    write_dicom_series(array, str(folder), (2.0, 1.0, 1.0), "1.2.826.0.1.3680043.2.1125.88.1")
    other = tmp_path / "other"
    write_dicom_series(array, str(other), (2.0, 1.0, 1.0), "1.2.826.0.1.3680043.2.1125.88.2")
    for name in os.listdir(other):
        shutil.copy(other / name, folder / f"B{name}")
    with pytest.raises(BadCaseError, match="2 DICOM series"):
        read_volume("P8", str(folder))


# ---------------------------------------------------------------------------------------------
# Split rule

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


def test_missing_spacing_is_noted(tmp_path):
    folder = str(tmp_path / "cohort")
    rows = write_cohort(folder)
    rows[2]["xy_spacing"] = ""
    write_csv(os.path.join(folder, "metadata.csv"), rows, COLUMNS_V2)
    listing = list_cases(folder, PrepParams())
    case = next(c for c in listing.cases if c.patient_id == rows[2]["pid"])
    assert case.spacing is None
    assert any("1 patients lack `xy_spacing`" in note and rows[2]["pid"] in note
               for note in listing.notes), listing.notes
