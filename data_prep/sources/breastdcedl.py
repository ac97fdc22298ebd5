"""The BreastDCEDL layout: a metadata CSV and one NIfTI per DCE time point and patient.

File names (found anywhere below the source folder):
  I-SPY2: `<pid>_spy2_vis1_dce_aqc_<t>.nii.gz`, mask `<pid>_spy2_vis1_mask.nii.gz`
  I-SPY1: `<pid>_spy1_vis1_acq<t>.nii.gz`,      mask `<pid>_spy1_vis1_mask.nii.gz`
  Duke:   `<pid>_duke_aqc_<t>.nii.gz`,          no mask: the box columns of the CSV.

Two metadata releases are accepted: the first (25 columns, label `HER2pos`, no box columns, no
`dataset` column, floats such as `2.0`, an empty `test` for some patients) and the later one
(29 columns, label `HER2`). Real spacing is only in the CSV (`slice_thick`, `xy_spacing`); the
NIfTI arrays are (z, y, x) with an identity affine. Patients with an empty `test` value go to the
training split (validation and test stay exactly the official ones); the report counts them.
"""
from __future__ import annotations

import csv
import dataclasses
import glob
import os

from data_prep.errors import BadCaseError
from data_prep.params import PrepParams
from data_prep.sources import Case, Listing, parse_label, reject_duplicates

NAMING = {
    "spy2": ("{pid}_spy2_vis1_dce_aqc_{t}.nii.gz", "{pid}_spy2_vis1_mask.nii.gz"),
    "spy1": ("{pid}_spy1_vis1_acq{t}.nii.gz", "{pid}_spy1_vis1_mask.nii.gz"),
    "duke": ("{pid}_duke_aqc_{t}.nii.gz", None),
}
REQUIRED_COLUMNS = {"pid", "n_times", "pre", "post_early", "post_late"}
OFFICIAL_SPLIT = {0: "train", 1: "test", 2: "validation"}


def find_metadata(source: str) -> list[str]:
    """CSV files directly in `source` that carry the BreastDCEDL metadata columns."""
    found = []
    for path in sorted(glob.glob(os.path.join(source, "*.csv"))):
        with open(path, newline="") as handle:
            header = next(csv.reader(handle), [])
        if REQUIRED_COLUMNS <= {column.strip() for column in header}:
            found.append(path)
    return found


def index_nifti(source: str) -> dict[str, str]:
    """Maps each NIfTI basename below `source` to its path."""
    index = {}
    for root, _, files in os.walk(source):
        for name in files:
            if name.endswith((".nii.gz", ".nii")):
                index[name] = os.path.join(root, name)
    return index


def list_cases(source: str, params: PrepParams) -> Listing:
    csv_paths = find_metadata(source)
    if not csv_paths:
        raise FileNotFoundError(
            f"no BreastDCEDL metadata CSV (columns {sorted(REQUIRED_COLUMNS)}) in {source}, and no "
            f"manifest.csv: see README, 'Sources'")
    files = index_nifti(source)
    listing = Listing(kind="breastdcedl", cases=[])
    unassigned = 0
    for csv_path in csv_paths:
        with open(csv_path, newline="") as handle:
            for row in csv.DictReader(handle):
                row = {key.strip(): (value or "").strip() for key, value in row.items() if key}
                try:
                    case = _case_from_row(row, csv_path, files, params)
                except BadCaseError as error:
                    listing.problems.append(error)
                    continue
                if case.split is None and "test" in row:
                    case = dataclasses.replace(case, split="train")
                    unassigned += 1
                listing.cases.append(case)
    reject_duplicates(listing, ", ".join(csv_paths))
    no_spacing = sorted(case.patient_id for case in listing.cases if case.spacing is None)
    if no_spacing:
        listing.notes.append(
            f"{len(no_spacing)} patients lack `xy_spacing`/`slice_thick` in the metadata "
            f"({', '.join(no_spacing[:5])}{', ...' if len(no_spacing) > 5 else ''}); the files' "
            f"placeholder 1 mm spacing is used (it matters only to N4)")
    if unassigned:
        listing.notes.append(f"{unassigned} patients have no official split in the metadata "
                             f"(`test` empty) and were put in the training split")
    return listing


def _case_from_row(row: dict[str, str], csv_path: str, files: dict[str, str],
                   params: PrepParams) -> Case:
    pid = row.get("pid", "")
    if not pid:
        raise BadCaseError("<no pid>", csv_path, "row without a patient id")
    label_column = "HER2" if "HER2" in row else "HER2pos"
    label = parse_label(pid, csv_path, row.get(label_column))
    naming = _naming_for(pid, row, files)
    n_times = _integer(pid, csv_path, row, "n_times")
    indices = params.phases or tuple(_integer(pid, csv_path, row, key)
                                     for key in ("pre", "post_early", "post_late"))
    phase_pattern, mask_pattern = NAMING[naming]
    phases = []
    for key, t in zip(("pre", "early", "late"), indices):
        name = phase_pattern.format(pid=pid, t=t)
        if not 0 <= t < n_times:
            raise BadCaseError(pid, name, f"phase index out of range ({key}={t}, n_times={n_times})")
        if name not in files:
            raise BadCaseError(pid, name, f"missing phase file ({key}, time point {t})")
        phases.append(files[name])
    mask, box = None, None
    if mask_pattern:
        name = mask_pattern.format(pid=pid)
        if name not in files:
            raise BadCaseError(pid, name, "missing tumour mask file")
        mask = files[name]
    else:
        box = tuple(_integer(pid, csv_path, row, key)
                    for key in ("mask_start", "mask_end", "sraw", "eraw", "scol", "ecol"))
        if min(box) < 0 or box[0] > box[1] or box[2] > box[3] or box[4] > box[5]:
            raise BadCaseError(pid, csv_path, f"invalid tumour box {box} (mask_start..mask_end, "
                                              f"sraw..eraw, scol..ecol: inclusive, non-negative)")
    return Case(
        patient_id=pid, label=label, cohort=row.get("dataset") or naming,
        phases=tuple(phases), mask=mask, box=box, stored_zyx=True,
        spacing=_spacing(row), split=_official_split(pid, csv_path, row.get("test")))


def _naming_for(pid: str, row: dict[str, str], files: dict[str, str]) -> str:
    """The naming convention of this patient's files: the `dataset` column, else what exists."""
    if row.get("dataset") in NAMING:
        return row["dataset"]
    for naming, (phase_pattern, _) in NAMING.items():
        prefix = phase_pattern.split("{t}")[0].format(pid=pid)
        if any(name.startswith(prefix) for name in files):
            return naming
    raise BadCaseError(pid, f"{pid}_*.nii.gz", "missing phase file (no DCE file for this patient)")


def _integer(pid: str, csv_path: str, row: dict[str, str], key: str) -> int:
    try:
        value = float(row[key])
    except (KeyError, ValueError):
        raise BadCaseError(pid, csv_path, f"column {key!r} missing or not a number "
                                          f"({row.get(key)!r})") from None
    if value != int(value):
        raise BadCaseError(pid, csv_path, f"column {key!r} is not an integer ({row[key]!r})")
    return int(value)


def _spacing(row: dict[str, str]) -> tuple[float, float, float] | None:
    try:
        xy, z = float(row["xy_spacing"]), float(row["slice_thick"])
    except (KeyError, ValueError):
        return None
    return (z, xy, xy)


def _official_split(pid: str, csv_path: str, raw: str | None) -> str | None:
    if raw is None or raw == "":
        return None
    try:
        return OFFICIAL_SPLIT[int(float(raw))]
    except (ValueError, KeyError):
        raise BadCaseError(pid, csv_path, f"invalid split value test={raw!r} "
                                          f"(expected 0 train, 1 test, 2 validation)") from None
