"""The manifest reader: NIfTI with header geometry, boxes, splits, external sets, DICOM series."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import tensorflow_datasets as tfds

from conftest import prepare_args, write_csv
from data_prep import pipeline, prepare, splits
from data_prep.errors import BadCaseError
from data_prep.params import PrepParams
from data_prep.sources import list_cases
from data_prep.volumes import read_volume


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


def test_a_manifest_saved_by_a_spreadsheet_lists_the_same_cases(manifest_source, tmp_path):
    """A byte-order mark, Windows line ends, semicolons, spaces around names and values, blank
    rows between and after: the same cases. Not UTF-8, NUL bytes, no label column: one line
    naming the file."""
    from data_prep.sources.table import read_table
    from her2jax.errors import BadInput

    folder, _, _ = manifest_source
    path = os.path.join(folder, "manifest.csv")
    original = list_cases(path, PrepParams()).cases
    names, rows = read_table(path)
    lines = ["; ".join(f" {name} " for name in names)]
    for row in rows:
        lines += [";".join(f" {row[name]}  " for name in names), ";;;"]
    text = "\r\n".join(lines) + "\r\n\r\n\r\n"
    with open(path, "wb") as handle:
        handle.write(b"\xef\xbb\xbf" + text.encode())
    assert list_cases(path, PrepParams()).cases == original
    for data, message in ((text.replace("cohort", "coh\xf6rt").encode("latin-1"),
                           r"not UTF-8 text \(byte 0xf6 at offset \d+\); save it as 'CSV UTF-8'"),
                          (b"PK\x03\x04\x00\x00", "holds NUL bytes; not a CSV text file"),
                          (text.replace(" label ", " her2 ").encode(),
                           r"manifest needs columns .* missing \['label'\] \(columns read: "
                           r"patient_id, her2, pre")):
        with open(path, "wb") as handle:
            handle.write(data)
        with pytest.raises(BadInput, match=f"^{path}: {message}"):
            list_cases(path, PrepParams())


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


def prepared(source: str, data_dir: str, *extra: str) -> str:
    """Runs `python -m data_prep.prepare`; returns the dataset folder (the last stdout line)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert prepare.main(prepare_args(source, data_dir, *extra)) == 0
    return out.getvalue().splitlines()[-1]


def examples(path: str) -> list[tuple]:
    builder = tfds.builder_from_directory(path)
    return sorted((split, e["patient_id"].decode(), int(e["slice_index"]), int(e["label"]),
                   e["cohort"].decode(), e["image"].tobytes(), e["mask"].tobytes())
                  for split in builder.info.splits
                  for e in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))


def test_prepare_from_the_manifest_csv_or_its_folder(manifest_source, tmp_path):
    folder, _, _ = manifest_source
    other_name = os.path.join(folder, "site_a.csv")        # any .csv name, not only manifest.csv
    shutil.copy(os.path.join(folder, "manifest.csv"), other_name)
    from_folder = prepared(folder, str(tmp_path / "a"), "--normalization", "nyul")
    from_file = prepared(other_name, str(tmp_path / "b"), "--normalization", "nyul")
    assert examples(from_file) == examples(from_folder)
    assert len({e[1] for e in examples(from_file)}) == 4
    assert tfds.builder_from_directory(from_file).info.metadata["source"] == {
        "path": other_name, "kind": "manifest", "release": None, "layout": "standard"}

    # an external set prepared like a run trained on `from_folder` (the two files --like reads)
    run = tmp_path / "run"
    run.mkdir()
    preparation = tfds.builder_from_directory(from_folder).info.metadata["preparation"]
    (run / "preparation.json").write_text(json.dumps(dict(preparation)))
    (run / "config.json").write_text(json.dumps({"data_dir": from_folder}))
    like = ("--like", str(run), "--external", "ambl")
    external_folder = examples(prepared(folder, str(tmp_path / "c"), *like))
    external_file = examples(prepared(os.path.join(folder, "manifest.csv"), str(tmp_path / "d"),
                                      *like))
    assert external_file == external_folder
    assert {(e[0], e[4]) for e in external_file} == {("external", "ambl")}
    assert len({e[1] for e in external_file}) == 4


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


@pytest.mark.parametrize("which", ["early", "mask"])
def test_a_file_on_another_voxel_grid_is_refused(manifest_source, which):
    """A phase or mask resampled apart (same shape, other spacing) would be fused voxel by
    voxel with the wrong anatomy: refused, naming the file and both spacings."""
    folder, arrays, spacing = manifest_source
    index = {"early": 1, "mask": 3}[which]
    path = os.path.join(folder, "M-0", f"{which}.nii.gz")
    write_nifti(arrays["M-0"][index], path, (2.0, 0.8, 0.7))
    case = next(c for c in list_cases(folder, PrepParams()).cases if c.patient_id == "M-0")
    with pytest.raises(BadCaseError) as error:
        pipeline.load_case(case, PrepParams())
    assert error.value.path == path
    expected = "the pre-contrast phase" if which == "early" else "the phases"
    assert f"voxel spacing 2x0.8x0.7 mm, not the 3x0.8x0.7 mm of {expected}" in str(error.value)
