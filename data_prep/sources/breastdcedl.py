"""The BreastDCEDL layout: a metadata CSV and NIfTI files of DCE time points and masks.

File names (found anywhere below the source folder):
  I-SPY2: `<pid>_spy2_vis1_dce_aqc_<t>.nii.gz`, mask `<pid>_spy2_vis1_mask.nii.gz`
  I-SPY1: `<pid>_spy1_vis1_acq<t>.nii.gz`,      mask `<pid>_spy1_vis1_mask.nii.gz`
  Duke:   `<pid>_duke_aqc_<t>.nii.gz`,          no mask: the box columns of the CSV.

Two versions of the dataset are read:
- the full version: every time point of each patient; the CSV's `pre`, `post_early`,
  `post_late` name the files to use. Its metadata came as a first release (25 columns, label
  `HER2pos`, no box columns, no `dataset` column, floats such as `2.0`, an empty `test` for some
  patients) and a later one (29 columns, label `HER2`).
- MinCrop (`BreastDCEDL_metadata_min_crop.csv` at the top, `*_min_crop/` folders below, Duke in
  `crop_min_dce/`), the version the study trained on: three volumes per patient (pre, early,
  late), cropped around the tumour. The CSV keeps the original acquisition indices, and the files
  may carry them or 0, 1, 2: a patient's three files are taken as pre, early, late in the order of
  their trailing index, and the report says for how many patients those indices were the CSV's.
  `mask_start`..`mask_end` are in cropped coordinates; `n_z` is not the depth (it is read from
  the volume).

Rows without a HER2 status (blank `HER2` and `HER2pos`, as some I-SPY1 rows are) are excluded and
counted, not errors; rows whose `HER2` and `HER2pos` disagree are errors. `--cohorts` keeps some of
the `dataset` values (spy1, spy2, duke); MinCrop keeps spy1 and spy2 unless told otherwise (the
study's HER2 cohort). Real spacing is only in the CSV (`slice_thick`, `xy_spacing`); the NIfTI
arrays are (z, y, x) with an identity affine. Patients with an empty `test` value go to the
training split (validation and test stay exactly the official ones); the report counts them.
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import os
import re

from data_prep.errors import BadCaseError
from data_prep.params import PrepParams
from data_prep.sources.cases import Case, Listing, cohort_reason, parse_label, reject_duplicates
from data_prep.sources.table import column_names, read_table
from her2jax.errors import BadInput, InvalidSetting, MissingInput

NAMING = {
    "spy2": ("{pid}_spy2_vis1_dce_aqc_{t}.nii.gz", "{pid}_spy2_vis1_mask.nii.gz"),
    "spy1": ("{pid}_spy1_vis1_acq{t}.nii.gz", "{pid}_spy1_vis1_mask.nii.gz"),
    "duke": ("{pid}_duke_aqc_{t}.nii.gz", None),
}
REQUIRED_COLUMNS = {"pid", "n_times", "pre", "post_early", "post_late"}
OFFICIAL_SPLIT = {0: "train", 1: "test", 2: "validation"}
COHORTS = tuple(sorted(NAMING))
MINCROP_COHORTS = ("spy1", "spy2")     # the study's: I-SPY1 + I-SPY2 with a HER2 status
NO_HER2 = "no HER2 status (HER2 and HER2pos blank)"
# a phase file's name: patient id, the cohort's infix, the time point
PHASE_FILE = re.compile(r"^(?P<pid>.+?)_(?P<infix>spy2_vis1_dce_aqc_|spy1_vis1_acq|duke_aqc_)"
                        r"(?P<t>\d+)\.nii(?:\.gz)?$")
INFIX = {"spy2_vis1_dce_aqc_": "spy2", "spy1_vis1_acq": "spy1", "duke_aqc_": "duke"}


def find_metadata(source: str) -> list[str]:
    """CSV files directly in `source` that carry the BreastDCEDL metadata columns."""
    found = []
    for path in sorted(glob.glob(os.path.join(source, "*.csv"))):
        if REQUIRED_COLUMNS <= column_names(path):
            found.append(path)
    return found


def release(source: str, csv_paths: list[str] | None = None) -> str:
    """"mincrop" when the folder is the MinCrop version (its CSV's name, or a `*_min_crop` or
    `crop_min_dce` folder at the top), else "full"."""
    csv_paths = find_metadata(source) if csv_paths is None else csv_paths
    if any("min_crop" in os.path.basename(path).lower() for path in csv_paths):
        return "mincrop"
    folders = [name.lower() for name in os.listdir(source)
               if os.path.isdir(os.path.join(source, name))]
    if any(name.endswith("_min_crop") or name == "crop_min_dce" for name in folders):
        return "mincrop"
    return "full"


def index_nifti(source: str) -> dict[str, str]:
    """Maps each NIfTI basename below `source` to its path."""
    index = {}
    for root, _, files in os.walk(source):
        for name in files:
            if name.endswith((".nii.gz", ".nii")):
                index[name] = os.path.join(root, name)
    return index


def index_phases(files: dict[str, str]) -> dict[tuple[str, str], dict[int, str]]:
    """(patient id, cohort) -> {time point: path} of the phase files among `files`."""
    phases: dict[tuple[str, str], dict[int, str]] = collections.defaultdict(dict)
    for name, path in files.items():
        match = PHASE_FILE.match(name)
        if match:
            phases[(match["pid"], INFIX[match["infix"]])][int(match["t"])] = path
    return phases


def list_cases(source: str, params: PrepParams) -> Listing:
    csv_paths = find_metadata(source)
    if not csv_paths:
        raise MissingInput(
            f"no BreastDCEDL metadata CSV (columns {sorted(REQUIRED_COLUMNS)}) in {source}, and no "
            f"manifest.csv: see README, 'Sources'")
    files = index_nifti(source)
    found = index_phases(files)
    kind = release(source, csv_paths)
    listing = Listing(kind="breastdcedl", cases=[], release=kind, layout="breastdcedl")
    cohorts = params.cohorts or (MINCROP_COHORTS if kind == "mincrop" else None)
    if cohorts and not set(cohorts) <= set(COHORTS):
        raise InvalidSetting(f"--cohorts {','.join(cohorts)}: BreastDCEDL's cohorts are "
                             f"{', '.join(COHORTS)}")
    unassigned = 0
    for csv_path in csv_paths:
        names, rows = read_table(csv_path)
        if not {"HER2", "HER2pos"} & set(names):
            raise BadInput(f"{csv_path}: no label column: BreastDCEDL metadata needs `HER2` or "
                           f"`HER2pos` (columns read: {', '.join(names)})")
        for row in rows:
            try:
                case = _case_from_row(row, csv_path, files, found, params, kind, cohorts,
                                      listing)
            except BadCaseError as error:
                listing.problems.append(error)
                continue
            if case is None:
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
    if kind == "mincrop":
        listing.notes.append(f"read as BreastDCEDL MinCrop; cohorts kept: {', '.join(cohorts)}"
                             + ("" if params.cohorts else " (the default for MinCrop, the "
                                                          "study's: --cohorts to change)"))
        rules = collections.Counter(listing.phase_rules[c.patient_id] for c in listing.cases)
        if rules:
            listing.notes.append(
                "phase files: " + "; ".join(f"{n} patients {PHASE_RULES[rule]}"
                                            for rule, n in sorted(rules.items())))
    return listing


PHASE_RULES = {
    "csv": "named by the CSV's acquisition indices (pre, post_early, post_late)",
    "order": "with three files whose indices are not the CSV's: taken as pre, early, late in the "
             "order of their trailing index",
    "given": "chosen by --phases",
}


def _case_from_row(row: dict[str, str], csv_path: str, files: dict[str, str],
                   found: dict[tuple[str, str], dict[int, str]], params: PrepParams, kind: str,
                   cohorts: tuple[str, ...] | None, listing: Listing) -> Case | None:
    """The row's case; None when the row is excluded by rule (recorded in `listing`)."""
    pid = row.get("pid", "")
    if not pid:
        raise BadCaseError("<no pid>", csv_path, "row without a patient id")
    naming = _naming_for(pid, row, found)
    if cohorts and naming not in cohorts:
        listing.exclude(pid, cohort_reason(naming, cohorts))
        return None
    label = _label(pid, csv_path, row)
    if label is None:
        listing.exclude(pid, NO_HER2)
        return None
    phase_pattern, mask_pattern = NAMING[naming]
    n_times = _integer(pid, csv_path, row, "n_times")
    indices = params.phases or tuple(_integer(pid, csv_path, row, key)
                                     for key in ("pre", "post_early", "post_late"))
    if kind == "mincrop":
        phases, rule = _mincrop_phases(pid, row, indices, found.get((pid, naming), {}),
                                       phase_pattern, given=params.phases is not None)
        listing.phase_rules[pid] = rule
    else:
        phases = []
        for key, t in zip(("pre", "early", "late"), indices):
            name = phase_pattern.format(pid=pid, t=t)
            if not 0 <= t < n_times:
                raise BadCaseError(pid, name,
                                   f"phase index out of range ({key}={t}, n_times={n_times})")
            if name not in files:
                raise BadCaseError(pid, name, f"missing phase file ({key}, time point {t})")
            phases.append(files[name])
    mask, box, tumour_range = None, None, None
    if mask_pattern:
        name = mask_pattern.format(pid=pid)
        if name not in files:
            raise BadCaseError(pid, name, "missing tumour mask file")
        mask = files[name]
        tumour_range = _tumour_range(row)
    else:
        box = tuple(_integer(pid, csv_path, row, key)
                    for key in ("mask_start", "mask_end", "sraw", "eraw", "scol", "ecol"))
        if min(box) < 0 or box[0] > box[1] or box[2] > box[3] or box[4] > box[5]:
            raise BadCaseError(pid, csv_path, f"invalid tumour box {box} (mask_start..mask_end, "
                                              f"sraw..eraw, scol..ecol: inclusive, non-negative)")
    return Case(
        patient_id=pid, label=label, cohort=row.get("dataset") or naming,
        phases=tuple(phases), mask=mask, box=box, stored_zyx=True,
        spacing=_spacing(row), split=_official_split(pid, csv_path, row.get("test")),
        tumour_range=tumour_range)


def _label(pid: str, csv_path: str, row: dict[str, str]) -> int | None:
    """HER2 status from `HER2` and `HER2pos` (either may be blank; both blank: None); when both
    are given they must agree."""
    values = {}
    for column in ("HER2", "HER2pos"):
        raw = row.get(column, "")
        if raw.lower() not in ("", "nan", "na", "none"):
            values[column] = parse_label(pid, csv_path, raw)
    if len(set(values.values())) > 1:
        raise BadCaseError(pid, csv_path, f"HER2 {values['HER2']} and HER2pos "
                                          f"{values['HER2pos']} disagree")
    return next(iter(values.values()), None)


def _mincrop_phases(pid: str, row: dict[str, str], indices: tuple[int, ...],
                    files: dict[int, str], pattern: str, given: bool) -> tuple[list[str], str]:
    """MinCrop ships three volumes per patient, named by the CSV's acquisition indices or by 0, 1,
    2: (pre, early, late paths, the rule that chose them)."""
    names = ", ".join(os.path.basename(files[t]) for t in sorted(files)) or "none"
    what = (f"--phases {','.join(map(str, indices))}" if given else
            "the CSV's pre, post_early, post_late " + ", ".join(map(str, indices)))
    if not files:
        raise BadCaseError(pid, pattern.format(pid=pid, t="*"),
                           "missing phase file (no DCE file for this patient)")
    if given or len(files) != 3:
        if all(t in files for t in indices) and len(set(indices)) == 3:
            return [files[t] for t in indices], "given" if given else "csv"
        raise BadCaseError(pid, pattern.format(pid=pid, t="*"),
                           f"cannot tell pre, early, late: {len(files)} files ({names}), not "
                           f"three, and not {what}")
    ordered = sorted(files)
    return [files[t] for t in ordered], "csv" if tuple(ordered) == tuple(indices) else "order"


def _tumour_range(row: dict[str, str]) -> tuple[int, int] | None:
    try:
        first, last = float(row["mask_start"]), float(row["mask_end"])
    except (KeyError, ValueError):
        return None
    return int(first), int(last)


def _naming_for(pid: str, row: dict[str, str],
                found: dict[tuple[str, str], dict[int, str]]) -> str:
    """The naming convention of this patient's files: the `dataset` column, else what exists."""
    if row.get("dataset") in NAMING:
        return row["dataset"]
    for naming in NAMING:
        if (pid, naming) in found:
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
