"""The BreastDCEDL reader: both metadata releases, real fixture files, Duke, I-SPY1, --phases."""
from __future__ import annotations

import csv
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from conftest import COLUMNS_V2, SHAPE, TUMOUR, save_zyx, write_cohort, write_csv
from data_prep import pipeline
from data_prep.errors import BadCaseError
from data_prep.params import PrepParams
from data_prep.sources import list_cases
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


# BreastDCEDL, later release (29 columns), Duke and I-SPY1 naming, --phases


def test_later_release_label_dataset_and_split(cohort):
    folder, rows = cohort
    # the later release's label column is HER2: HER2pos may be blank (both agree when given)
    for row in rows:
        row["HER2pos"] = ""
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


def test_metadata_without_a_label_column_is_refused_naming_the_columns(cohort):
    """Not every patient blamed for a missing HER2 status: the file, in one line."""
    from her2jax.errors import BadInput

    folder, rows = cohort
    kept = [column for column in rows[0] if column not in ("HER2", "HER2pos")]
    write_csv(os.path.join(folder, "metadata.csv"), rows, kept)
    with pytest.raises(BadInput, match=r"metadata.csv: no label column: BreastDCEDL metadata "
                                       r"needs `HER2` or `HER2pos` \(columns read: pid, "):
        list_cases(folder, PrepParams())


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
