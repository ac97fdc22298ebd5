"""Bad input to `python -m data_prep.prepare`: a clear one-line error, or a recorded skip.

Without --skip_bad every problem stops preparation with return code 1 and one stderr line
`error: patient <id>: <file>: <reason>`, and no dataset that looks complete is left behind.
With --skip_bad the patient is left out of the TFRecords and recorded (dataset metadata,
skipped.csv, preparation_report.md), and every other patient is still written.
"""
from __future__ import annotations

import csv
import dataclasses
import os
import re
import shutil
from typing import Callable

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import tensorflow_datasets as tfds

from conftest import COLUMNS_V2, SHAPE, save_zyx, write_csv, prepare_args
from data_prep import pipeline, prepare
from data_prep.params import PrepParams
from data_prep.sources import list_cases

PID = "T-001"   # a training patient (the tiny cohort's validation and test splits hold one each)


@dataclasses.dataclass(frozen=True)
class Bad:
    """What the error must say: patient, offending file (basename) and reason (regex)."""

    pid: str
    file: str
    reason: str
    stage: str          # "listing": found in the metadata, before any image is read; or "image"


def phase_path(folder: str, pid: str, t: int) -> str:
    return os.path.join(folder, "dce", f"{pid}_spy2_vis1_dce_aqc_{t}.nii.gz")


def mask_path(folder: str, pid: str) -> str:
    return os.path.join(folder, "mask", f"{pid}_spy2_vis1_mask.nii.gz")


def rewrite_metadata(folder: str, rows: list[dict]) -> None:
    write_csv(os.path.join(folder, "metadata.csv"), rows, COLUMNS_V2)


def load_zyx(path: str) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


# --- the bad inputs: each mutates the tiny cohort in place and says what the error must name ---

def missing_phase(folder, rows):
    os.remove(phase_path(folder, PID, 1))
    return Bad(PID, os.path.basename(phase_path(folder, PID, 1)), r"missing phase file", "listing")


def missing_mask(folder, rows):
    os.remove(mask_path(folder, PID))
    return Bad(PID, os.path.basename(mask_path(folder, PID)), r"missing tumour mask", "listing")


def gzip_cut_in_half(folder, rows):
    path = phase_path(folder, PID, 1)
    with open(path, "rb") as handle:
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(data[:len(data) // 2])
    return Bad(PID, os.path.basename(path), r"truncated or corrupt image data", "image")


def random_bytes(folder, rows):
    path = phase_path(folder, PID, 0)
    with open(path, "wb") as handle:
        handle.write(np.random.default_rng(1).bytes(5000))
    return Bad(PID, os.path.basename(path), r"unreadable image", "image")


def empty_file(folder, rows):
    path = mask_path(folder, PID)
    open(path, "wb").close()
    return Bad(PID, os.path.basename(path), r"unreadable image", "image")


def phases_of_different_shapes(folder, rows):
    path = phase_path(folder, PID, 3)            # the late phase (post_late = n_times - 1 = 3)
    save_zyx(load_zyx(path)[:, :, :30].copy(), path)
    return Bad(PID, os.path.basename(path), r"phases of different shapes", "image")


def empty_mask(folder, rows):
    path = mask_path(folder, PID)
    save_zyx(np.zeros(SHAPE, np.int32), path)
    return Bad(PID, os.path.basename(path), r"empty tumour mask", "image")


def mask_shape_mismatch(folder, rows):
    path = mask_path(folder, PID)
    save_zyx(load_zyx(path)[:, :, :39].copy(), path)
    return Bad(PID, os.path.basename(path), r"mask shape mismatch", "image")


def nan_voxels(folder, rows):
    path = phase_path(folder, PID, 1)
    array = load_zyx(path).astype(np.float32)
    array[4, 20, 20] = np.nan
    array[0, 0, 0] = np.nan
    save_zyx(array, path)
    return Bad(PID, os.path.basename(path), r"\b2 NaN/inf voxels", "image")


def inf_voxels(folder, rows):
    path = phase_path(folder, PID, 0)
    array = load_zyx(path).astype(np.float32)
    array[5, 18, 22] = np.inf
    save_zyx(array, path)
    return Bad(PID, os.path.basename(path), r"\b1 NaN/inf voxels", "image")


def complex_voxels(folder, rows):
    path = phase_path(folder, PID, 1)
    save_zyx(load_zyx(path).astype(np.complex64) * (1 + 1j), path)
    return Bad(PID, os.path.basename(path), r"voxels of type complex64 are not real numbers",
               "image")


def constant_volume(folder, rows):
    path = phase_path(folder, PID, 1)
    save_zyx(np.full(SHAPE, 7.0, np.float32), path)
    return Bad(PID, os.path.basename(path), r"constant volume", "image")


def label(value: str, reason: str) -> Callable:
    def mutate(folder, rows):
        rows[1]["HER2"] = value
        rewrite_metadata(folder, rows)
        return Bad(PID, "metadata.csv", reason, "listing")
    return mutate


def duplicate_patient_id(folder, rows):
    rewrite_metadata(folder, rows + [dict(rows[1])])
    return Bad(PID, "metadata.csv", r"duplicate patient id \(2 rows\)", "listing")


def phase_index(key: str, value: int, shown: str) -> Callable:
    def mutate(folder, rows):
        rows[1][key] = value
        rewrite_metadata(folder, rows)
        return Bad(PID, f"{PID}_spy2_vis1_dce_aqc_{value}.nii.gz",
                   rf"phase index out of range \({shown}={value}, n_times=4\)", "listing")
    return mutate


BAD_INPUTS = [
    pytest.param(missing_phase, id="missing_phase_file"),
    pytest.param(missing_mask, id="missing_mask_file"),
    pytest.param(gzip_cut_in_half, id="gzip_cut_in_half"),
    pytest.param(random_bytes, id="random_bytes"),
    pytest.param(empty_file, id="empty_file"),
    pytest.param(phases_of_different_shapes, id="phases_of_different_shapes"),
    pytest.param(empty_mask, id="empty_mask"),
    pytest.param(mask_shape_mismatch, id="mask_shape_mismatch"),
    pytest.param(nan_voxels, id="nan_voxels"),
    pytest.param(inf_voxels, id="inf_voxels"),
    pytest.param(constant_volume, id="constant_volume"),
    pytest.param(complex_voxels, id="complex_voxels"),
    pytest.param(label("1", r"HER2 1 and HER2pos 0 disagree"), id="label_disagrees"),
    pytest.param(label("maybe", r"invalid HER2 label 'maybe'"), id="label_maybe"),
    pytest.param(label("3", r"invalid HER2 label '3'"), id="label_3"),
    pytest.param(duplicate_patient_id, id="duplicate_patient_id"),
    pytest.param(phase_index("post_late", 4, "late"), id="post_late_eq_n_times"),
    pytest.param(phase_index("pre", -1, "pre"), id="pre_negative"),
]


# --- checks ---

def assert_no_complete_dataset(data_dir: str) -> None:
    """Nothing under data_dir, outside a TFDS `*incomplete*` folder, opens or looks finished."""
    for root, _, files in os.walk(data_dir):
        if "incomplete" in os.path.relpath(root, data_dir):
            continue
        assert "dataset_info.json" not in files, root
        assert not [name for name in files if ".tfrecord" in name], root
        with pytest.raises(Exception):
            tfds.builder_from_directory(root)


def assert_one_line_error(err: str, bad: Bad) -> str:
    assert "Traceback" not in err, err
    lines = err.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error:")]
    assert len(starts) == 1, err
    line, after = lines[starts[0]], lines[starts[0] + 1:starts[0] + 2]
    # one line: the message ends where the hint starts
    assert after == ["(use --skip_bad to record such cases and go on)"], err
    assert line.startswith(f"error: patient {bad.pid}: "), line
    assert bad.file in line, line
    assert re.search(bad.reason, line), line
    return line


def read_back(path: str) -> tuple[tfds.core.DatasetBuilder, dict[str, set[str]]]:
    """The dataset at `path` and, per split, the patient ids found in its TFRecords."""
    builder = tfds.builder_from_directory(path)
    found = {}
    for split in builder.info.splits:
        found[split] = {example["patient_id"].decode()
                        for example in tfds.as_numpy(builder.as_dataset(split=split))}
    return builder, found


def assert_skipped(path: str, bad: Bad, good: set[str], stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    builder, found = read_back(path)
    written = set().union(*found.values())
    assert bad.pid not in written
    assert written == good
    listed = set().union(*builder.info.metadata["patients"].values())
    assert bad.pid not in listed and good <= listed, builder.info.metadata["patients"]
    recorded = list(builder.info.metadata["skipped"])
    assert [r["patient_id"] for r in recorded] == [bad.pid], recorded
    assert bad.file in recorded[0]["file"], recorded
    assert re.search(bad.reason, recorded[0]["reason"]), recorded
    assert "\n" not in recorded[0]["reason"], recorded
    with open(os.path.join(path, "skipped.csv"), newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["patient_id"] for row in rows] == [bad.pid]
    assert bad.file in rows[0]["file"] and re.search(bad.reason, rows[0]["reason"]), rows
    with open(os.path.join(path, "preparation_report.md")) as handle:
        report = handle.read()
    assert "## Skipped cases (1)" in report
    assert f"`{bad.pid}`" in report and re.search(bad.reason, report)


@pytest.fixture
def read_spy(monkeypatch):
    """Patient ids whose images the preparation read (in this process)."""
    calls = []
    real = pipeline.read_volume

    def spy(patient_id, path, *args, **kwargs):
        calls.append(patient_id)
        return real(patient_id, path, *args, **kwargs)

    monkeypatch.setattr(pipeline, "read_volume", spy)
    return calls


# --- one test per bad input and behaviour ---

@pytest.mark.parametrize("mutate", BAD_INPUTS)
def test_bad_input_stops_with_one_line_error(mutate, cohort, tmp_path, capsys, read_spy):
    folder, rows = cohort
    bad = mutate(folder, rows)
    data_dir = str(tmp_path / "out")
    assert prepare.main(prepare_args(folder, data_dir)) == 1
    assert_one_line_error(capsys.readouterr().err, bad)
    assert_no_complete_dataset(data_dir)
    assert not os.path.exists(data_dir), "a failed preparation leaves no empty folders behind"
    if bad.stage == "listing":
        assert read_spy == [], "a metadata problem must stop preparation before any image is read"


@pytest.mark.parametrize("mutate", BAD_INPUTS)
def test_bad_input_skipped_with_skip_bad(mutate, cohort, tmp_path, capsys):
    folder, rows = cohort
    good = {row["pid"] for row in rows} - {PID}
    bad = mutate(folder, rows)
    assert prepare.main(prepare_args(folder, str(tmp_path / "out"), "--skip_bad")) == 0
    out, err = capsys.readouterr()
    assert_skipped(out.strip().splitlines()[-1], bad, good, err)


# --- worker processes (spawn): errors still name patient and file ---

WORKER_INPUTS = [pytest.param(gzip_cut_in_half, id="gzip_cut_in_half"),
                 pytest.param(constant_volume, id="constant_volume")]


@pytest.mark.parametrize("mutate", WORKER_INPUTS)
def test_bad_input_with_two_workers_stops(mutate, cohort, tmp_path, capsys):
    folder, rows = cohort
    bad = mutate(folder, rows)
    data_dir = str(tmp_path / "out")
    assert prepare.main(prepare_args(folder, data_dir, "--workers", "2")) == 1
    line = assert_one_line_error(capsys.readouterr().err, bad)
    assert os.path.join(folder, "dce", bad.file) in line     # the full path, not only the name
    assert_no_complete_dataset(data_dir)


@pytest.mark.parametrize("mutate", WORKER_INPUTS)
def test_bad_input_with_two_workers_skipped(mutate, cohort, tmp_path, capsys):
    folder, rows = cohort
    good = {row["pid"] for row in rows} - {PID}
    bad = mutate(folder, rows)
    args = prepare_args(folder, str(tmp_path / "out"), "--workers", "2", "--skip_bad")
    assert prepare.main(args) == 0
    out, err = capsys.readouterr()
    assert_skipped(out.strip().splitlines()[-1], bad, good, err)


# --- a normalisation fitted on the training split reads training cases twice ---

@pytest.mark.parametrize("skip_bad", [False, True], ids=["stops", "skip_bad"])
def test_bad_training_case_with_fitted_normalization(skip_bad, cohort, tmp_path, capsys):
    folder, rows = cohort
    good = {row["pid"] for row in rows} - {PID}
    bad = gzip_cut_in_half(folder, rows)
    data_dir = str(tmp_path / "out")
    extra = ["--normalization", "nyul"] + (["--skip_bad"] if skip_bad else [])
    rc = prepare.main(prepare_args(folder, data_dir, *extra))
    out, err = capsys.readouterr()
    if skip_bad:
        assert rc == 0
        assert_skipped(out.strip().splitlines()[-1], bad, good, err)   # recorded once
    else:
        assert rc == 1
        assert_one_line_error(err, bad)
        assert_no_complete_dataset(data_dir)


# --- an unusable --source, and what a failure leaves in --data_dir ---

def unusable_source(kind: str, source) -> str:
    """Makes `source` (a pathlib path) unusable in one way; returns the reason the error gives."""
    if kind == "missing":
        return r"does not exist"
    if kind == "not_csv":
        source.write_text("pid,HER2\n")
        return r"not a folder or a manifest CSV file"
    source.mkdir()
    if kind == "no_metadata":
        (source / "notes.csv").write_text("patient,comment\nT-000,fine\n")
        save_zyx(np.zeros(SHAPE, np.float32), str(source / "T-000_spy2_vis1_dce_aqc_0.nii.gz"))
    return r"holds no BreastDCEDL metadata CSV \(columns .*\) and no manifest\.csv"


@pytest.mark.parametrize("kind", ["missing", "empty_folder", "no_metadata", "not_csv"])
def test_unusable_source_stops_before_tfds_starts(kind, tmp_path, capsys):
    source = tmp_path / ("source.txt" if kind == "not_csv" else "source")
    reason = unusable_source(kind, source)
    data_dir = tmp_path / "out"
    args = [arg for arg in prepare_args(str(source), str(data_dir)) if arg != "--quiet"]
    assert prepare.main(args) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1, (out, err)
    assert re.fullmatch(rf"error: --source {re.escape(str(source))}: {reason}.*\n", err), err
    assert not data_dir.exists()


def test_bucket_paths_are_refused_with_the_copy_to_make(cohort, tmp_path, capsys):
    """Preparation reads and writes local files: a gs:// source or data folder stops at once."""
    folder, _ = cohort
    assert prepare.main(prepare_args("gs://lab/cohort", str(tmp_path / "out"))) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --source gs://lab/cohort: preparation reads local files") \
        and "gcloud storage rsync -r gs://lab/cohort DIR" in err and len(err.splitlines()) == 1
    assert prepare.main(prepare_args(folder, "gs://lab/prepared")) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --data_dir gs://lab/prepared: preparation writes local files") \
        and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_failure_removes_only_what_it_created_and_left_empty(cohort, tmp_path, capsys):
    folder, rows = cohort
    constant_volume(folder, rows)
    data_dir = tmp_path / "out"
    for existing in (data_dir / "downloads", data_dir / "her2_dce" / "other" / "1.0.0",
                     data_dir / "her2_dce" / PrepParams(image_size=16).config_name()):
        existing.mkdir(parents=True)                      # empty, but not made by this run
    (data_dir / "her2_dce" / "other" / "1.0.0" / "notes.txt").write_text("kept")
    before = sorted(os.walk(data_dir))
    assert prepare.main(prepare_args(folder, str(data_dir))) == 1
    assert "constant volume" in capsys.readouterr().err
    assert sorted(os.walk(data_dir)) == before


# --- interrupted preparation ---

def test_keyboard_interrupt_leaves_no_complete_dataset(cohort, tmp_path, monkeypatch, capsys):
    folder, rows = cohort
    data_dir = str(tmp_path / "out")
    real = pipeline.prepare_case
    calls = []

    def interrupted(case, *args):
        calls.append(case.patient_id)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return real(case, *args)

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "prepare_case", interrupted)
        assert prepare.main(prepare_args(folder, data_dir)) == 130
    assert len(calls) == 3
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "stopped by SIGINT: the worker processes ended and the unfinished dataset was removed "
        f"from {data_dir}")
    assert_no_complete_dataset(data_dir)

    assert prepare.main(prepare_args(folder, data_dir)) == 0
    _, found = read_back(capsys.readouterr().out.strip().splitlines()[-1])
    assert set().union(*found.values()) == {row["pid"] for row in rows}


def test_bad_case_in_last_split_then_rerun_after_fix(cohort, tmp_path, monkeypatch, capsys):
    """Train and validation are written before the failing test patient: still nothing complete."""
    folder, rows = cohort
    last = "T-004"                               # the only patient of `test`, written last
    assert [row["pid"] for row in rows if row["test"] == 1] == [last]
    data_dir = str(tmp_path / "out")
    original = str(tmp_path / "original.nii.gz")
    shutil.copy(phase_path(folder, last, 3), original)
    save_zyx(np.full(SHAPE, 3.0, np.float32), phase_path(folder, last, 3))

    real = pipeline.prepare_case
    calls = []

    def spy(case, *args):
        calls.append(case.patient_id)
        return real(case, *args)

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "prepare_case", spy)
        assert prepare.main(prepare_args(folder, data_dir)) == 1
    assert sorted(calls) == sorted(row["pid"] for row in rows) and calls[-1] == last
    assert_one_line_error(capsys.readouterr().err,
                          Bad(last, os.path.basename(phase_path(folder, last, 3)),
                              r"constant volume", "image"))
    assert_no_complete_dataset(data_dir)

    shutil.copy(original, phase_path(folder, last, 3))
    assert prepare.main(prepare_args(folder, data_dir)) == 0
    builder, found = read_back(capsys.readouterr().out.strip().splitlines()[-1])
    assert found["test"] == {last}
    assert set().union(*found.values()) == {row["pid"] for row in rows}
    assert list(builder.info.metadata["skipped"]) == []


# --- metadata problems surface in the listing stage, before any image is read ---

def test_metadata_error_wins_over_earlier_unreadable_image(cohort, tmp_path, capsys, read_spy):
    folder, rows = cohort
    random_bytes(folder, rows)                   # T-001's image is bad too, and comes first
    rows[5]["HER2"] = "maybe"
    rewrite_metadata(folder, rows)
    assert prepare.main(prepare_args(folder, str(tmp_path / "out"))) == 1
    assert_one_line_error(capsys.readouterr().err,
                          Bad("T-005", "metadata.csv", r"invalid HER2 label 'maybe'", "listing"))
    assert read_spy == []


def test_list_cases_collects_every_metadata_problem_without_reading(cohort, monkeypatch):
    folder, rows = cohort

    def no_reading(*args, **kwargs):
        raise AssertionError("list_cases must not read images")

    monkeypatch.setattr(sitk, "ReadImage", no_reading)
    monkeypatch.setattr(nib, "load", no_reading)
    rows[1]["HER2"] = "maybe"
    rows[2]["post_late"] = 4
    os.remove(phase_path(folder, "T-003", 0))
    rewrite_metadata(folder, rows + [dict(rows[6])])

    listing = list_cases(folder, PrepParams(image_size=16))
    problems = {error.patient_id: str(error) for error in listing.problems}
    assert set(problems) == {"T-001", "T-002", "T-003", "T-006"}
    assert {case.patient_id for case in listing.cases} == {"T-000", "T-004", "T-005", "T-007"}
    for pid, message in problems.items():
        assert message.startswith(f"patient {pid}: ") and "\n" not in message
    assert re.search(r"metadata\.csv: invalid HER2 label 'maybe'", problems["T-001"])
    assert re.search(r"T-002_spy2_vis1_dce_aqc_4\.nii\.gz: phase index out of range",
                     problems["T-002"])
    assert re.search(r"T-003_spy2_vis1_dce_aqc_0\.nii\.gz: missing phase file", problems["T-003"])
    assert re.search(r"metadata\.csv: duplicate patient id \(2 rows\)", problems["T-006"])


@pytest.mark.parametrize("workers", [1, 2], ids=["main_process", "worker_process"])
def test_any_exception_while_preparing_a_patient_is_that_patients_error(workers, tmp_path,
                                                                        monkeypatch):
    """In the main process as in a worker: one line naming the patient and the file read
    last; `--debug` (HER2JAX_DEBUG) keeps the traceback instead."""
    from data_prep import her2_dce
    from data_prep.errors import BadCaseError
    from data_prep.sources import Case
    from exploding import explode     # a light module: worker processes import it

    path = str(tmp_path / "P-7_pre.nii.gz")
    save_zyx(np.arange(24, dtype=np.float32).reshape(2, 3, 4), path)
    case = Case(patient_id="P-7", label=1, cohort="c", phases=(path, path, path),
                box=(0, 1, 0, 2, 0, 3))
    with her2_dce._worker_pool(workers) as pool:
        [(_, error)] = list(her2_dce._map(explode, [case], (PrepParams(),), pool))
    assert isinstance(error, BadCaseError)
    assert str(error) == (f"patient P-7: {path}: ZeroDivisionError while preparing it: a "
                          "library's surprise (an unusual file, or a her2jax bug: prepare "
                          "--debug shows the traceback)")
    monkeypatch.setenv("HER2JAX_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        list(her2_dce._map(explode, [case], (PrepParams(),), None))
