"""BreastDCEDL MinCrop, the version the study trained on: the real metadata rows, volumes in its
geometry (the two real masks cut to the tumour plus 2 slices), both file namings, unlabelled and
inconsistent rows, Duke boxes and cohort selection."""
from __future__ import annotations

import csv
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from conftest import prepare_args, save_zyx
from data_prep import pipeline, prepare
from data_prep.errors import BadCaseError
from data_prep.params import PrepParams
from data_prep.sources import breastdcedl, list_cases

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
ROWS_CSV = os.path.join(FIXTURES, "breastdcedl_mincrop", "BreastDCEDL_metadata_min_crop.excerpt.csv")
REAL_MASKS = os.path.join(FIXTURES, "breastdcedl_ispy2", "mask")
CSV_NAME = "BreastDCEDL_metadata_min_crop.csv"
FOLDERS = {"spy2": ("BreastDCEDL_ISPY2_min_crop/dce", "BreastDCEDL_ISPY2_min_crop/mask"),
           "spy1": ("BreastDCEDL_ISPY1_min_crop/dce", "BreastDCEDL_ISPY1_min_crop/mask"),
           "duke": ("BreastDCEDL_DUKE_min_crop/crop_min_dce", None)}
# the full release's tumour extent of the two patients whose real masks are shipped
REAL_EXTENT = {"ACRIN-6698-102212": (15, 52), "ACRIN-6698-104268": (36, 60)}
UNLABELLED = "ISPY1_1144"
MASK_TRUTH = {"ISPY1_1165": (2, 37)}        # its CSV says 1..37; the mask is the truth
SMALL = 24                                   # in-plane side of the stand-in I-SPY volumes


def rows() -> dict[str, dict[str, str]]:
    with open(ROWS_CSV, newline="") as handle:
        return {row["pid"]: row for row in csv.DictReader(handle)}


def number(row: dict[str, str], key: str) -> int:
    return int(float(row[key]))


def indices(row: dict[str, str]) -> list[int]:
    return [number(row, key) for key in ("pre", "post_early", "post_late")]


def phase_name(pid: str, cohort: str, t: int) -> str:
    return breastdcedl.NAMING[cohort][0].format(pid=pid, t=t)


def stand_in(mask: np.ndarray, t: int) -> np.ndarray:
    """An int16 (z, y, x) phase: ramps on every axis, the tumour brighter with each phase."""
    z, y, x = np.indices(mask.shape, dtype=np.int32)
    return (200 + 3 * z + y + x + 300 * t * (mask > 0)).astype(np.int16)


def cropped_real_mask(pid: str) -> np.ndarray:
    """The real full-release mask cut as MinCrop cuts it: the tumour's slices plus 2 each side."""
    mask = nib.load(os.path.join(REAL_MASKS, f"{pid}_spy2_vis1_mask.nii.gz")).get_fdata()
    first, last = REAL_EXTENT[pid]
    return mask[first - 2:last + 3].astype(np.int32)


def small_mask(row: dict[str, str]) -> np.ndarray:
    """A stand-in mask of the row's tumour range in a volume 2 slices deeper on each side."""
    first, last = MASK_TRUTH.get(row["pid"], (number(row, "mask_start"), number(row, "mask_end")))
    mask = np.zeros((last + 3, SMALL, SMALL), np.int32)
    mask[first:last + 1, 6:15, 8:18] = 1
    return mask


def duke_volumes(row: dict[str, str]) -> list[np.ndarray]:
    """256 x 256 phases with the tumour enhancing inside the CSV's box (Duke has no mask)."""
    first, last = number(row, "mask_start"), number(row, "mask_end")
    inside = np.zeros((last + 3, 256, 256), np.int32)
    inside[first:last + 1, number(row, "sraw"):number(row, "eraw") + 1,
           number(row, "scol"):number(row, "ecol") + 1] = 1
    return [stand_in(inside, t) for t in range(3)]


@pytest.fixture(scope="module")
def mincrop(tmp_path_factory):
    """The MinCrop layout with every row's files named by the CSV's acquisition indices."""
    folder = tmp_path_factory.mktemp("mincrop") / "BreastDCEDL_MinCrop"
    for dce, mask in FOLDERS.values():
        os.makedirs(folder / dce)
        if mask:
            os.makedirs(folder / mask)
    shutil.copy(ROWS_CSV, folder / CSV_NAME)
    masks = {}
    for pid, row in rows().items():
        cohort = row["dataset"]
        dce, mask_folder = FOLDERS[cohort]
        if cohort == "duke":
            volumes = duke_volumes(row)
        else:
            mask = cropped_real_mask(pid) if pid in REAL_EXTENT else small_mask(row)
            save_zyx(mask, str(folder / mask_folder / f"{pid}_{cohort}_vis1_mask.nii.gz"))
            masks[pid] = mask
            volumes = [stand_in(mask, t) for t in range(3)]
        for t, volume in zip(indices(row), volumes):
            save_zyx(volume, str(folder / dce / phase_name(pid, cohort, t)))
    return folder, masks


@pytest.fixture(scope="module")
def mincrop_012(mincrop, tmp_path_factory):
    """The same files named 0, 1, 2 in the order of their acquisition index (linked, not copied)."""
    source, _ = mincrop
    folder = tmp_path_factory.mktemp("mincrop012") / "BreastDCEDL_MinCrop"
    shutil.copytree(source, folder, copy_function=os.link)
    for pid, row in rows().items():
        dce = folder / FOLDERS[row["dataset"]][0]
        for order, t in enumerate(indices(row)):
            os.rename(dce / phase_name(pid, row["dataset"], t),
                      dce / phase_name(pid, row["dataset"], f"new{order}"))
        for order in range(3):
            os.rename(dce / phase_name(pid, row["dataset"], f"new{order}"),
                      dce / phase_name(pid, row["dataset"], order))
    return folder


def test_mincrop_listing_labels_cohorts_and_phase_rule(mincrop, mincrop_012):
    source, _ = mincrop
    table = rows()
    for folder, rule in ((source, "csv"), (mincrop_012, "order")):
        listing = list_cases(str(folder), PrepParams())
        assert listing.problems == []
        assert listing.release == "mincrop" and listing.layout == "breastdcedl"
        cases = {case.patient_id: case for case in listing.cases}
        spy = {pid for pid, row in table.items() if row["dataset"] in ("spy1", "spy2")}
        assert set(cases) == spy - {UNLABELLED}
        reasons = {e["patient_id"]: e["reason"] for e in listing.excluded}
        assert reasons[UNLABELLED] == breastdcedl.NO_HER2
        assert {pid for pid, reason in reasons.items() if "cohort duke not selected" in reason} \
            == {pid for pid, row in table.items() if row["dataset"] == "duke"}
        assert listing.excluded_counts() == {
            "cohort duke not selected (--cohorts spy1,spy2)": 4, breastdcedl.NO_HER2: 1}
        # HER2 with a blank HER2pos is a label; the official split is kept
        assert cases["ISPY1_1120"].label == 0 and cases["ISPY1_1035"].label == 1
        assert cases["ACRIN-6698-107700"].label == 1 and cases["ACRIN-6698-102212"].split == "test"
        for pid, case in cases.items():
            row = table[pid]
            cohort = row["dataset"]
            expected = indices(row) if folder == source else [0, 1, 2]
            assert [os.path.basename(p) for p in case.phases] == \
                [phase_name(pid, cohort, t) for t in expected]
            assert case.tumour_range == (number(row, "mask_start"), number(row, "mask_end"))
            # files named 0, 1, 2 are the CSV's own indices only where those are 0, 1, 2
            own = indices(row) == [0, 1, 2]
            assert listing.phase_rules[pid] == ("csv" if own or rule == "csv" else "order")
        notes = " ".join(listing.notes)
        assert "read as BreastDCEDL MinCrop" in notes and "spy1, spy2" in notes
        if rule == "order":
            assert "taken as pre, early, late in the order of their trailing index" in notes


def tfrecord_rows(dataset_dir: str) -> list[dict]:
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(dataset_dir)
    out = []
    for split in builder.info.splits:
        for example in tfds.as_numpy(builder.as_dataset(split=split)):
            out.append({"split": split, "patient_id": example["patient_id"].decode(),
                        "slice_index": int(example["slice_index"]),
                        "tumour_pixels": int((example["mask"] > 0).sum())})
    return out


@pytest.mark.parametrize("naming", ["csv_indices", "zero_one_two"])
def test_prepare_mincrop_without_skip_bad(naming, mincrop, mincrop_012, tmp_path, capsys):
    """The acceptance: either naming prepares without --skip_bad, the unlabelled row is counted as
    excluded, and every slice lies inside the tumour range of the cropped volume."""
    source, masks = mincrop
    folder = source if naming == "csv_indices" else mincrop_012
    code = prepare.main(prepare_args(str(folder), str(tmp_path / "data")))
    err = capsys.readouterr()
    assert code == 0, err.err
    dataset = err.out.strip().splitlines()[-1]
    assert "read BreastDCEDL MinCrop (spy1, spy2)" in err.err
    assert "excluded rows: 5 (4 cohort duke not selected" in err.err
    assert os.path.basename(os.path.dirname(dataset)) == PrepParams(image_size=16).config_name()
    metadata = json.load(open(os.path.join(dataset, "metadata.json")))
    assert metadata["source"]["release"] == "mincrop"
    assert metadata["excluded_counts"][breastdcedl.NO_HER2] == 1
    assert {"patient_id": UNLABELLED, "reason": breastdcedl.NO_HER2} in metadata["excluded"]
    assert metadata["skipped"] == []
    report = open(os.path.join(dataset, "preparation_report.md")).read()
    assert "MinCrop version" in report and f"- {breastdcedl.NO_HER2}: 1" in report
    # ISPY1_1165's metadata says 1..37, its mask 2..37: recorded, the mask wins
    assert list(metadata["case_notes"]) == ["ISPY1_1165"]
    assert "2..37 in the mask, 1..37 in the metadata" in metadata["case_notes"]["ISPY1_1165"][0]
    table = rows()
    written = tfrecord_rows(dataset)
    assert {r["patient_id"] for r in written} == set(masks) - {UNLABELLED}
    for record in written:
        pid, z = record["patient_id"], record["slice_index"]
        tumour_z = np.nonzero(masks[pid].any(axis=(1, 2)))[0]
        assert tumour_z[0] <= z <= tumour_z[-1], (pid, z)
        assert number(table[pid], "mask_start") <= z <= number(table[pid], "mask_end"), (pid, z)
        assert record["tumour_pixels"] > 0, (pid, z)
    by_patient = {}
    for record in written:
        by_patient.setdefault(record["patient_id"], []).append(record["slice_index"])
    # the real masks keep their tumour: central 4 of 2..39 and of 2..26 in the cropped volumes
    assert sorted(by_patient["ACRIN-6698-102212"]) == [19, 20, 21, 22]
    assert sorted(by_patient["ACRIN-6698-104268"]) == [12, 13, 14, 15]
    # ISPY1_1202: n_z says 1, the volume has 17 slices and the tumour 2..14
    assert sorted(by_patient["ISPY1_1202"]) == [6, 7, 8, 9]
    expected_rule = "csv" if naming == "csv_indices" else "order"
    assert metadata["phase_rules"]["ACRIN-6698-102212"] == expected_rule
    assert metadata["files"]["ACRIN-6698-102212"][2] == phase_name(
        "ACRIN-6698-102212", "spy2", 6 if naming == "csv_indices" else 2)


def test_duke_boxes_and_cohort_selection(mincrop):
    source, _ = mincrop
    table = rows()
    listing = list_cases(str(source), PrepParams(cohorts=("duke",)))
    assert listing.problems == []
    cases = {case.patient_id: case for case in listing.cases}
    assert set(cases) == {pid for pid, row in table.items() if row["dataset"] == "duke"}
    assert len(listing.excluded) == len(table) - 4
    params = PrepParams(normalization="global_minmax", image_size=16, slices_per_patient=4)
    for pid, case in cases.items():
        row = table[pid]
        assert case.mask is None and case.tumour_range is None
        assert case.box == tuple(number(row, k) for k in ("mask_start", "mask_end", "sraw", "eraw",
                                                          "scol", "ecol"))
        prepared = pipeline.prepare_case(case, params)
        first, last = number(row, "mask_start"), number(row, "mask_end")
        chosen = [s.slice_index for s in prepared.slices]
        # the same rule as for masks: the central 4 slices of the tumour range
        start = first + (last - first + 1 - min(4, last - first + 1)) // 2
        assert chosen == list(range(start, start + min(4, last - first + 1)))
        assert prepared.notes == []
    # every cohort, and the name says which were kept
    everything = list_cases(str(source), PrepParams(cohorts=("duke", "spy1", "spy2")))
    assert len(everything.cases) == len(table) - 1
    assert [e["patient_id"] for e in everything.excluded] == [UNLABELLED]
    assert PrepParams(cohorts=("duke", "spy1", "spy2")).config_name() == \
        "per_channel_clip_q98_duke-spy1-spy2"
    assert PrepParams(cohorts=("spy1", "spy2"), image_size=16).config_name().startswith(
        "per_channel_clip_q98_spy1-spy2_")
    assert "cohorts" not in PrepParams().to_dict()     # older datasets keep their names


def test_phase_files_that_no_rule_explains_name_the_files(mincrop, tmp_path):
    source, _ = mincrop
    folder = tmp_path / "odd"
    shutil.copytree(source, folder, copy_function=os.link)
    dce = folder / FOLDERS["spy2"][0]
    # a fourth file beside the CSV's three: the CSV's indices still say which three
    os.link(dce / phase_name("ISPY2-892390", "spy2", 0), dce / phase_name("ISPY2-892390", "spy2", 9))
    # two files named 0, 1 and one missing: neither rule gives three files
    os.rename(dce / phase_name("ISPY2-924812", "spy2", 2), dce / phase_name("ISPY2-924812", "spy2", 1))
    os.remove(dce / phase_name("ISPY2-924812", "spy2", 6))
    listing = list_cases(str(folder), PrepParams())
    cases = {case.patient_id: case for case in listing.cases}
    assert [os.path.basename(p)[-9:] for p in cases["ISPY2-892390"].phases] == \
        ["_0.nii.gz", "_2.nii.gz", "_6.nii.gz"]
    (problem,) = listing.problems
    assert problem.patient_id == "ISPY2-924812"
    assert problem.path == "ISPY2-924812_spy2_vis1_dce_aqc_*.nii.gz"
    assert ("2 files (ISPY2-924812_spy2_vis1_dce_aqc_0.nii.gz, "
            "ISPY2-924812_spy2_vis1_dce_aqc_1.nii.gz)") in problem.reason
    assert "pre, post_early, post_late 0, 2, 6" in problem.reason


def test_her2_columns_that_disagree_are_an_error(mincrop, tmp_path):
    source, _ = mincrop
    folder = tmp_path / "disagree"
    shutil.copytree(source, folder, copy_function=os.link)
    os.remove(folder / CSV_NAME)
    text = open(ROWS_CSV).read().splitlines()
    header = text[0].split(",")
    out = [text[0]]
    for line in text[1:]:
        cells = line.split(",")
        if cells[0] == "ISPY2-930172":
            cells[header.index("HER2pos")] = "0.0"
        out.append(",".join(cells))
    open(folder / CSV_NAME, "w").write("\n".join(out) + "\n")
    listing = list_cases(str(folder), PrepParams())
    (problem,) = listing.problems
    assert isinstance(problem, BadCaseError)
    assert str(problem) == (f"patient ISPY2-930172: {folder / CSV_NAME}: HER2 1 and HER2pos 0 "
                            f"disagree")
    assert "ISPY2-930172" not in {case.patient_id for case in listing.cases}


def test_the_metadata_tumour_range_is_checked_against_the_mask():
    """The mask wins a small disagreement, recorded as a note; ranges that do not overlap (a
    mask of another patient, axes in another order) are the patient's error."""
    from data_prep.pipeline import range_notes
    from data_prep.sources.cases import Case

    case = Case(patient_id="ISPY2-1", label=1, cohort="spy2", phases=("a", "b", "c"),
                mask="/data/ISPY2-1_mask.nii.gz", tumour_range=(10, 20))
    assert range_notes(case, (10, 20, 0, 5, 0, 5)) == []
    assert range_notes(case, (11, 22, 0, 5, 0, 5)) == [
        "tumour slices 11..22 in the mask, 10..20 in the metadata: the mask's are used"]
    with pytest.raises(BadCaseError, match=r"^patient ISPY2-1: /data/ISPY2-1_mask.nii.gz: tumour "
                                           r"slices 30..40 in the mask and 10..20 in the metadata "
                                           r"do not overlap"):
        range_notes(case, (30, 40, 0, 5, 0, 5))
