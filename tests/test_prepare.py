"""End-to-end tests of `python -m data_prep.prepare`: TFRecords, metadata, report, reuse."""
from __future__ import annotations

import collections
import contextlib
import csv
import dataclasses
import io
import json
import os
import types

import nibabel as nib
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import data_prep
from conftest import COLUMNS_V2, SHAPE, TUMOUR, prepare_args, save_zyx, write_cohort, write_csv
from data_prep import prepare
from data_prep.params import PrepParams

OFFICIAL = {0: "train", 1: "test", 2: "validation"}
FEATURES = {"image", "mask", "label", "patient_id", "slice_index", "cohort"}


def run_prepare(source: str, data_dir: str, *extra: str) -> tuple[int, list[str]]:
    """Runs prepare.main as the command line would; returns its exit code and stdout lines."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = prepare.main(prepare_args(source, data_dir, *extra))
    return rc, out.getvalue().splitlines()


def read_examples(path: str) -> dict[str, list[dict]]:
    builder = tfds.builder_from_directory(path)
    return {name: list(tfds.as_numpy(builder.as_dataset(split=name, shuffle_files=False)))
            for name in builder.info.splits}


def example_keys(examples: dict[str, list[dict]]) -> list[tuple]:
    return sorted((split, e["patient_id"].decode(), int(e["slice_index"]), int(e["label"]),
                   e["cohort"].decode(), e["image"].tobytes(), e["mask"].tobytes())
                  for split, group in examples.items() for e in group)


def phase_files(folder: str, pid: str, times) -> np.ndarray:
    return np.stack([nib.load(os.path.join(folder, "dce", f"{pid}_spy2_vis1_dce_aqc_{t}.nii.gz"))
                     .get_fdata() for t in times])


# ---------------------------------------------------------------------------------------------
# One preparation of the conftest cohort, shared by the checks below.
#   --image_size 18: the tumour box is 10 x 12 (y 14..23, x 16..27) and with the default margin
#   0.25 the square crop is 18 pixels, so the resize is the identity and every pixel of the
#   written image can be recomputed here. A 9th CSV row has no files: --skip_bad records it.

IMAGE_SIZE = 18
PHASES = (0, 2, 3)
MAIN_ARGS = ("--normalization", "global_clip_q99", "--image_size", str(IMAGE_SIZE),
             "--slices_per_patient", "2", "--phases", ",".join(map(str, PHASES)), "--skip_bad")
MAIN_PARAMS = PrepParams(normalization="global_clip_q99", image_size=IMAGE_SIZE,
                         slices_per_patient=2, phases=PHASES)


@pytest.fixture(scope="module")
def main_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("prepare_main")
    folder, data_dir = str(base / "cohort"), str(base / "prepared")
    rows = write_cohort(folder)
    ghost = dict(rows[0], pid="T-999", HER2=1, HER2pos=1, test=0)   # no files on disk
    write_csv(os.path.join(folder, "metadata.csv"), rows + [ghost], COLUMNS_V2)
    rc, lines = run_prepare(folder, data_dir, *MAIN_ARGS)
    assert rc == 0
    path = lines[-1]
    return types.SimpleNamespace(folder=folder, rows=rows, data_dir=data_dir, lines=lines,
                                 path=path, builder=tfds.builder_from_directory(path),
                                 examples=read_examples(path))


def test_last_stdout_line_is_the_dataset_folder(main_run):
    path = main_run.path
    assert os.path.isdir(path)
    assert path == os.path.join(main_run.data_dir, "her2_dce", MAIN_PARAMS.config_name(), "1.0.0")
    assert os.path.isfile(os.path.join(path, "dataset_info.json"))
    assert not any(".incomplete" in name for name in os.listdir(os.path.dirname(path)))


def test_schema_matches_design(main_run):
    features = main_run.builder.info.features
    assert set(features.keys()) == FEATURES
    assert isinstance(features["image"], tfds.features.Image)
    assert features["image"].shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert features["image"].dtype == np.uint8
    assert isinstance(features["mask"], tfds.features.Image)
    assert features["mask"].shape == (IMAGE_SIZE, IMAGE_SIZE, 1)
    assert features["mask"].dtype == np.uint8
    assert isinstance(features["label"], tfds.features.ClassLabel)
    assert features["label"].names == ["HER2-", "HER2+"]
    assert isinstance(features["patient_id"], tfds.features.Text)
    assert isinstance(features["cohort"], tfds.features.Text)
    assert np.issubdtype(features["slice_index"].np_dtype, np.integer)
    assert features["slice_index"].shape == ()
    for group in main_run.examples.values():
        for example in group:
            assert set(example) == FEATURES
            assert example["image"].shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
            assert example["image"].dtype == np.uint8
            assert example["mask"].shape == (IMAGE_SIZE, IMAGE_SIZE, 1)
            assert example["mask"].dtype == np.uint8
            assert isinstance(example["patient_id"], bytes)
            assert isinstance(example["cohort"], bytes)
            assert np.issubdtype(np.asarray(example["slice_index"]).dtype, np.integer)


def test_labels_cohort_and_official_splits(main_run):
    rows = {row["pid"]: row for row in main_run.rows}
    where = collections.defaultdict(set)
    for split, group in main_run.examples.items():
        for example in group:
            pid = example["patient_id"].decode()
            where[pid].add(split)
            assert example["label"] == rows[pid]["HER2"]
            assert example["cohort"] == b"spy2"
    assert set(where) == set(rows)                       # T-999 skipped, everyone else written
    assert all(len(s) == 1 for s in where.values())      # never in two splits
    assert {pid: s.pop() for pid, s in where.items()} == {pid: OFFICIAL[row["test"]]
                                                           for pid, row in rows.items()}


def test_slices_per_patient_are_the_central_tumour_slices(main_run):
    by_patient = collections.defaultdict(list)
    for group in main_run.examples.values():
        for example in group:
            by_patient[example["patient_id"]].append(int(example["slice_index"]))
    # tumour z 3..6 (4 slices): the central 2 are 4 and 5
    z0, z1 = TUMOUR[0].start, TUMOUR[0].stop - 1
    central = [z0 + (z1 - z0 + 1 - 2) // 2, z0 + (z1 - z0 + 1 - 2) // 2 + 1]
    assert central == [4, 5]
    assert len(by_patient) == len(main_run.rows)
    for indices in by_patient.values():
        assert sorted(indices) == central


def test_image_is_the_fused_normalised_phases(main_run):
    """Every pixel recomputed: global q99 clip over the 3 phases, R = pre, G = early, B = late,
    crop = the 18-pixel square centred on the tumour box."""
    y0, y1 = TUMOUR[1].start, TUMOUR[1].stop - 1
    x0, x1 = TUMOUR[2].start, TUMOUR[2].stop - 1
    side = round(max(y1 - y0 + 1, x1 - x0 + 1) * 1.5)
    assert side == IMAGE_SIZE
    top = int(round((y0 + y1 + 1) / 2 - side / 2))
    left = int(round((x0 + x1 + 1) / 2 - side / 2))
    mask = np.zeros(SHAPE, np.uint8)
    mask[TUMOUR] = 1
    expected_by_patient = {}
    for row in main_run.rows:
        x = phase_files(main_run.folder, row["pid"], PHASES)
        lo, hi = x.min(), np.percentile(x, 99)
        expected_by_patient[row["pid"]] = np.rint(255 * np.clip((x - lo) / (hi - lo), 0, 1))
    means = []
    for group in main_run.examples.values():
        for example in group:
            z = int(example["slice_index"])
            eight_bit = expected_by_patient[example["patient_id"].decode()]
            crop = eight_bit[:, z, top:top + side, left:left + side]
            np.testing.assert_array_equal(example["image"],
                                          np.moveaxis(crop, 0, -1).astype(np.uint8))
            np.testing.assert_array_equal(example["mask"][..., 0],
                                          mask[z, top:top + side, left:left + side])
            inside = example["mask"][..., 0] > 0
            means.append(example["image"][inside].astype(float).mean(axis=0))
    r, g, b = np.mean(means, axis=0)
    # the tumour brightens with time and global_clip_q99 shares one scale: B >= G >= R
    assert b >= g >= r
    assert b - r > 50


def test_metadata_records_the_preparation(main_run):
    metadata = main_run.builder.info.metadata
    assert metadata["preparation"] == MAIN_PARAMS.to_dict()
    # every field, except cohorts when none was chosen and the crop when it is the default
    # tumour crop (as datasets recorded them before they could be chosen)
    assert set(metadata["preparation"]) == {f.name for f in dataclasses.fields(PrepParams)} - {
        "cohorts", "crop", "crop_size"}
    assert metadata["source"] == {"path": os.path.abspath(main_run.folder), "kind": "breastdcedl",
                                  "release": "full", "layout": "breastdcedl"}
    assert metadata["excluded"] == [] and metadata["excluded_counts"] == {}
    assert metadata["code_version"] == data_prep.code_version()
    assert metadata["code_version"].startswith(data_prep.__version__)
    for row in main_run.rows:
        if row["pid"] != "T-999":
            assert metadata["files"][row["pid"]] == [           # the --phases override
                f"{row['pid']}_spy2_vis1_dce_aqc_{t}.nii.gz" for t in PHASES] + [
                f"{row['pid']}_spy2_vis1_mask.nii.gz"]
    assert metadata["split_rule"] == "from the source"
    assert metadata["normalization_fit"] is None
    expected = collections.defaultdict(list)
    for row in main_run.rows:
        expected[OFFICIAL[row["test"]]].append(row["pid"])
    for split in ("train", "validation", "test"):
        assert metadata["patients"][split] == sorted(expected[split])
    assert not metadata["patients"].get("external")
    assert [s["patient_id"] for s in metadata["skipped"]] == ["T-999"]
    assert "missing phase file" in metadata["skipped"][0]["reason"]


def count_examples(examples: dict[str, list[dict]]) -> dict[tuple, tuple[int, int]]:
    """(split, label name, cohort) -> (patients, slices), counted from the TFRecords."""
    patients, slices = collections.defaultdict(set), collections.Counter()
    for split, group in examples.items():
        for example in group:
            key = (split, ("HER2-", "HER2+")[example["label"]], example["cohort"].decode())
            patients[key].add(example["patient_id"])
            slices[key] += 1
    return {key: (len(patients[key]), slices[key]) for key in slices}


def test_report_files(main_run):
    path = main_run.path
    for name in ("preparation_report.md", "preparation_report.json", "skipped.csv",
                 "qc_montage.png"):
        assert os.path.isfile(os.path.join(path, name)), name
    with Image.open(os.path.join(path, "qc_montage.png")) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(os.path.join(path, "qc_montage.png")) as image:
        assert image.size[0] > 100 and image.size[1] > 100
        assert np.asarray(image.convert("L")).std() > 0       # not a blank picture
    with open(os.path.join(path, "skipped.csv"), newline="") as handle:
        skipped = list(csv.DictReader(handle))
    assert [row["patient_id"] for row in skipped] == ["T-999"]
    assert skipped[0]["file"] and skipped[0]["reason"].startswith("missing phase file")

    expected = count_examples(main_run.examples)
    # the markdown counts table
    with open(os.path.join(path, "preparation_report.md")) as handle:
        text = handle.read()
    table = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] in ("train", "validation", "test", "external"):
            table[tuple(cells[:3])] = (int(cells[3]), int(cells[4]))
    assert table == expected
    assert "T-999" in text
    # the JSON report carries the same counts and parameters
    with open(os.path.join(path, "preparation_report.json")) as handle:
        report = json.load(handle)
    counts = collections.defaultdict(dict)
    for split, label, cohort, what, n in report["counts"]:
        counts[(split, label, cohort)][what] = n
    assert {k: (v["patients"], v["slices"]) for k, v in counts.items()} == expected
    assert report["preparation"] == MAIN_PARAMS.to_dict()
    # TFDS's own split sizes agree
    for split, info in main_run.builder.info.splits.items():
        assert info.num_examples == len(main_run.examples[split])


# ---------------------------------------------------------------------------------------------
# Nyul: landmarks fitted on the training patients only

def nyul_landmarks(folder: str, pids: list[str], times) -> np.ndarray:
    """Mean over patients of each phase's percentiles (1, 10..90, 99) mapped p1 -> 0, p99 -> 100."""
    percentiles = [1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 99]
    mapped = []
    for pid in pids:
        per_phase = []
        for phase in phase_files(folder, pid, times).astype(np.float32).astype(np.float64):
            q = np.percentile(phase, percentiles)
            per_phase.append(100 * (q - q[0]) / (q[-1] - q[0]))
        mapped.append(per_phase)
    return np.mean(mapped, axis=0)


def test_nyul_fitted_on_training_patients_only(tmp_path):
    folder = str(tmp_path / "cohort")
    rows = write_cohort(folder, patients=7, times=3)           # splits 0 0 0 0 1 2 0
    # T-001 (training) has an unreadable file: skipped once, left out of the fit and the lists
    with open(os.path.join(folder, "dce", "T-001_spy2_vis1_dce_aqc_2.nii.gz"), "wb") as handle:
        handle.write(b"not a NIfTI file")
    train = [row["pid"] for row in rows if row["test"] == 0 and row["pid"] != "T-001"]
    (validation,) = [row["pid"] for row in rows if row["test"] == 2]
    rc, lines = run_prepare(folder, str(tmp_path / "a"), "--normalization", "nyul", "--skip_bad")
    assert rc == 0
    metadata = tfds.builder_from_directory(lines[-1]).info.metadata
    assert [(s["patient_id"], os.path.basename(s["file"])) for s in metadata["skipped"]] == \
        [("T-001", "T-001_spy2_vis1_dce_aqc_2.nii.gz")]
    assert metadata["patients"]["train"] == train
    written = {e["patient_id"].decode() for group in read_examples(lines[-1]).values()
               for e in group}
    assert written == {row["pid"] for row in rows} - {"T-001"}
    fit = metadata["normalization_fit"]
    assert fit["percentiles"] == [1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 99]
    expected = nyul_landmarks(folder, train, (0, 1, 2))
    np.testing.assert_allclose(fit["standard_landmarks"], expected, rtol=1e-9, atol=1e-9)
    assert metadata["preparation"]["normalization"] == "nyul"

    # a wildly different validation patient: a skewed, much brighter histogram in every phase
    rng = np.random.default_rng(9)
    for t in range(3):
        save_zyx((rng.exponential(1.0, SHAPE) ** 3 * 5000 + 10).astype(np.float32),
                 os.path.join(folder, "dce", f"{validation}_spy2_vis1_dce_aqc_{t}.nii.gz"))
    changed = nyul_landmarks(folder, [validation], (0, 1, 2))
    assert np.abs(changed - expected).max() > 5      # it would move the mean if it were used
    rc, lines = run_prepare(folder, str(tmp_path / "b"), "--normalization", "nyul", "--skip_bad")
    assert rc == 0
    refit = tfds.builder_from_directory(lines[-1]).info.metadata["normalization_fit"]
    assert refit == fit


def test_nyul_fit_does_not_depend_on_worker_completion_order(cohort, tmp_path, monkeypatch):
    from data_prep import her2_dce
    from data_prep.sources import list_cases

    folder, _ = cohort
    params = PrepParams(normalization="nyul", image_size=16)
    train = [c for c in list_cases(folder, params).cases if c.split == "train"]
    assert len(train) == 6
    builder = her2_dce.Her2Dce(config=her2_dce.make_config(params), data_dir=str(tmp_path),
                               progress=False)
    in_order = builder._fit_normalization(train)
    serial_map = her2_dce._map
    # workers finish in any order: here, the reverse of the submission order
    monkeypatch.setattr(her2_dce, "_map", lambda *args: reversed(list(serial_map(*args))))
    assert builder._fit_normalization(train) == in_order


def test_qc_samples_do_not_depend_on_the_order_workers_finish(tmp_path):
    from data_prep import her2_dce

    params = PrepParams(normalization="global_minmax", image_size=16)
    examples = [{"patient_id": f"P{i:02d}", "label": i % 2, "slice_index": s}
                for i in range(20) for s in (3, 4)]
    kept = []
    shuffled = sorted(examples, key=lambda e: e["patient_id"][::-1])
    for order in (examples, examples[::-1], shuffled):
        builder = her2_dce.Her2Dce(config=her2_dce.make_config(params),
                                   data_dir=str(tmp_path / "data"), progress=False)
        for example in order:
            builder._keep_for_qc(example)
        kept.append({label: [(k["patient_id"], k["slice_index"]) for k in samples]
                     for label, samples in builder.qc_samples.items()})
    assert kept[0] == kept[1] == kept[2]
    assert [pid for pid, _ in kept[0][0]] == ["P00", "P02", "P04", "P06", "P08", "P10"]
    assert [pid for pid, _ in kept[0][1]] == ["P01", "P03", "P05", "P07", "P09", "P11"]


def test_building_a_new_dataset_leaves_no_temporary_folder(tmp_path, monkeypatch):
    """TFDS's lookup of public metadata for an unknown dataset leaves an empty folder in the
    system's temporary directory per builder; her2_dce skips that lookup."""
    import tempfile

    from data_prep import her2_dce

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    params = PrepParams(normalization="global_minmax", image_size=16)
    builder = her2_dce.Her2Dce(config=her2_dce.make_config(params),
                               data_dir=str(tmp_path / "data"), progress=False)
    assert isinstance(builder.info, her2_dce.LocalDatasetInfo)
    assert builder.info.features["image"].shape == (16, 16, 3)
    assert list(scratch.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Parallel workers, reuse, overwrite, external

def test_two_workers_write_the_same_examples(cohort, tmp_path):
    folder, _ = cohort
    rc1, lines1 = run_prepare(folder, str(tmp_path / "one"), "--slices_per_patient", "0")
    rc2, lines2 = run_prepare(folder, str(tmp_path / "two"), "--slices_per_patient", "0",
                              "--workers", "2")
    assert rc1 == rc2 == 0
    one, two = read_examples(lines1[-1]), read_examples(lines2[-1])
    assert example_keys(one) == example_keys(two)
    # slices_per_patient 0: every tumour slice (z 3..6) of every patient
    per_patient = collections.defaultdict(list)
    for group in two.values():
        for example in group:
            per_patient[example["patient_id"]].append(int(example["slice_index"]))
    assert len(per_patient) == 8
    assert all(sorted(v) == [3, 4, 5, 6] for v in per_patient.values())


def file_times(path: str) -> dict[str, int]:
    return {name: os.stat(os.path.join(path, name)).st_mtime_ns for name in os.listdir(path)}


def test_second_run_reuses_and_overwrite_rebuilds(tmp_path, capsys):
    folder, data_dir = str(tmp_path / "cohort"), str(tmp_path / "prepared")
    write_cohort(folder, patients=4, times=3)
    rc, lines = run_prepare(folder, data_dir)
    assert rc == 0
    path = lines[-1]
    before_times, before = file_times(path), example_keys(read_examples(path))

    # change one patient's pre-contrast phase on disk
    rng = np.random.default_rng(42)
    mask = np.zeros(SHAPE, np.float32)
    mask[TUMOUR] = 1
    save_zyx((rng.uniform(1000, 3000, SHAPE) + 2000 * mask).astype(np.float32),
             os.path.join(folder, "dce", "T-001_spy2_vis1_dce_aqc_0.nii.gz"))

    rc, lines = run_prepare(folder, data_dir)                   # same arguments: reused
    assert rc == 0 and lines[-1] == path
    assert file_times(path) == before_times
    assert example_keys(read_examples(path)) == before

    rc, lines = run_prepare(folder, data_dir, "--overwrite")    # rebuilt from the source
    assert rc == 0 and lines[-1] == path
    after = example_keys(read_examples(path))
    assert file_times(path)["dataset_info.json"] != before_times["dataset_info.json"]
    changed = {key[1] for key in set(after) ^ set(before)}
    assert changed == {"T-001"}
    assert len(after) == len(before)
    assert os.path.isfile(os.path.join(path, "preparation_report.md"))

    # the same settings from another source: refused, not the first source's data handed back
    other = str(tmp_path / "other")
    write_cohort(other, patients=5, times=3, seed=3)
    rebuilt = file_times(path)
    assert prepare.main(prepare_args(other, data_dir)) == 1
    err = capsys.readouterr().err
    assert f"holds a dataset prepared with these settings from {folder}, not from " in err
    assert "--overwrite to replace it" in err and file_times(path) == rebuilt
    rc, lines = run_prepare(other, data_dir, "--overwrite")
    assert rc == 0 and lines[-1] == path
    assert {key[1] for key in example_keys(read_examples(path))} == {
        f"T-{i:03d}" for i in range(5)}


def test_external_cohort(tmp_path):
    folder = str(tmp_path / "cohort")
    rows = write_cohort(folder, patients=3, times=3)
    rc, lines = run_prepare(folder, str(tmp_path / "prepared"), "--external", "AMBL",
                            "--slices_per_patient", "1")
    assert rc == 0
    builder = tfds.builder_from_directory(lines[-1])
    assert set(builder.info.splits) == {"external"}
    examples = read_examples(lines[-1])["external"]
    assert sorted(e["patient_id"].decode() for e in examples) == [r["pid"] for r in rows]
    assert {e["cohort"] for e in examples} == {b"AMBL"}
    assert builder.info.metadata["patients"]["external"] == [r["pid"] for r in rows]
    assert builder.info.metadata["preparation"]["external"] == "AMBL"


def test_bad_case_without_skip_bad_fails_with_a_message(tmp_path, capsys):
    folder = str(tmp_path / "cohort")
    write_cohort(folder, patients=3, times=3)
    os.remove(os.path.join(folder, "mask", "T-002_spy2_vis1_mask.nii.gz"))
    rc, lines = run_prepare(folder, str(tmp_path / "prepared"))
    assert rc == 1
    error = capsys.readouterr().err
    assert "T-002" in error and "mask" in error and "--skip_bad" in error
    assert not os.path.isdir(os.path.join(str(tmp_path / "prepared"), "her2_dce",
                                          PrepParams(image_size=16).config_name(), "1.0.0"))


def test_fitted_normalization_of_an_external_set_needs_fit_from(tmp_path, capsys):
    folder, data_dir = str(tmp_path / "cohort"), str(tmp_path / "prepared")
    write_cohort(folder, patients=2, times=3)
    assert prepare.main(prepare_args(folder, data_dir, "--normalization", "nyul",
                                     "--external", "AMBL")) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: --external AMBL: "), err
    assert "no training patient" not in err
    assert "'nyul'" in err and "training split" in err and "--fit_from" in err and "--like" in err
    assert not os.path.exists(data_dir)


def test_quiet_leaves_out_the_tfds_lines(tmp_path, capfd):
    folder = str(tmp_path / "cohort")
    write_cohort(folder, patients=3, times=3)
    tfds_lines = ("Downloading and preparing dataset", "downloaded and prepared to")
    config = PrepParams(image_size=16).config_name()
    assert prepare.main(prepare_args(folder, str(tmp_path / "quiet"))) == 0
    out, err = capfd.readouterr()
    assert out.splitlines() == [str(tmp_path / "quiet" / "her2_dce" / config / "1.0.0")], out
    assert not [text for text in tfds_lines if text in out + err], err
    # without --quiet they are shown, on stderr: stdout still holds only the dataset folder
    loud = [arg for arg in prepare_args(folder, str(tmp_path / "loud")) if arg != "--quiet"]
    assert prepare.main(loud) == 0
    out, err = capfd.readouterr()
    assert out.splitlines() == [str(tmp_path / "loud" / "her2_dce" / config / "1.0.0")], out
    assert all(text in err for text in tfds_lines), err


def test_external_set_reuses_the_training_normalisation(tmp_path):
    training, external = str(tmp_path / "training"), str(tmp_path / "external")
    write_cohort(training, patients=6, times=3)
    write_cohort(external, patients=3, times=3, seed=5)
    rc, lines = run_prepare(training, str(tmp_path / "a"), "--normalization", "nyul")
    assert rc == 0
    trained = tfds.builder_from_directory(lines[-1]).info.metadata["normalization_fit"]
    rc, external_lines = run_prepare(external, str(tmp_path / "b"), "--normalization", "nyul",
                                     "--external", "AMBL", "--fit_from", lines[-1])
    assert rc == 0
    metadata = tfds.builder_from_directory(external_lines[-1]).info.metadata
    assert metadata["normalization_fit"] == trained
    assert metadata["preparation"]["fit_from"] == lines[-1]
    # without --fit_from an external-only source has no training split to fit on
    assert run_prepare(external, str(tmp_path / "c"), "--normalization", "nyul",
                       "--external", "AMBL")[0] == 1
    # a dataset prepared with another strategy has nothing to give
    rc, other = run_prepare(training, str(tmp_path / "d"), "--normalization", "zscore")
    assert run_prepare(external, str(tmp_path / "e"), "--normalization", "nyul", "--external",
                       "AMBL", "--fit_from", other[-1])[0] == 1
