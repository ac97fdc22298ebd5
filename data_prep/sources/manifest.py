"""A manifest CSV: any hospital's data, e.g. an external validation set.

Columns: `patient_id, label, pre, early, late` and `mask` or `box`; optional `split` (train,
validation, test, external) and `cohort`. `pre/early/late/mask` are NIfTI files or DICOM series
folders (one series per phase), relative to the manifest's folder or absolute; they are read with
their own header geometry (no BreastDCEDL axis trap). `box` is six voxel indices
`z0 z1 y0 y1 x0 x1` (inclusive, separated by spaces or commas) in the volume as read.
`label` is 0/1 or HER2-/HER2+. Rows without a split get the seeded, label-stratified split.
"""
from __future__ import annotations

import os
import re

from data_prep.errors import BadCaseError
from data_prep.params import SPLITS, PrepParams
from data_prep.sources.cases import Case, Listing, parse_label, reject_duplicates
from data_prep.sources.table import read_table
from her2jax.errors import BadInput

REQUIRED_COLUMNS = ("patient_id", "label", "pre", "early", "late")


def list_cases(path: str, params: PrepParams) -> Listing:
    folder = os.path.dirname(os.path.abspath(path))
    listing = Listing(kind="manifest", cases=[])
    names, rows = read_table(path)
    columns = set(names)
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing or not ({"mask", "box"} & columns):
        raise BadInput(f"{path}: manifest needs columns {list(REQUIRED_COLUMNS)} and `mask` or "
                       f"`box`; missing {missing or ['mask or box']} (columns read: "
                       f"{', '.join(names)})")
    for row in rows:
        try:
            listing.cases.append(_case_from_row(row, path, folder))
        except BadCaseError as error:
            listing.problems.append(error)
    reject_duplicates(listing, path)
    return listing


def _case_from_row(row: dict[str, str], path: str, folder: str) -> Case:
    pid = row["patient_id"]
    if not pid:
        raise BadCaseError("<no patient_id>", path, "row without a patient id")
    label = parse_label(pid, path, row.get("label"))
    phases = tuple(_existing(pid, folder, row[key], f"missing phase file ({key})")
                   for key in ("pre", "early", "late"))
    mask = row.get("mask") or None
    box = None
    if mask:
        mask = _existing(pid, folder, mask, "missing tumour mask file")
    elif row.get("box"):
        box = _parse_box(pid, path, row["box"])
    else:
        raise BadCaseError(pid, path, "neither mask nor box given")
    split = row.get("split") or None
    if split is not None and split not in SPLITS:
        raise BadCaseError(pid, path, f"invalid split {split!r} (expected one of {SPLITS})")
    return Case(patient_id=pid, label=label, cohort=row.get("cohort") or "manifest",
                phases=phases, mask=mask, box=box, split=split)


def _existing(pid: str, folder: str, value: str, reason: str) -> str:
    full = value if os.path.isabs(value) else os.path.join(folder, value)
    if not value or not os.path.exists(full):
        raise BadCaseError(pid, full if value else "-", reason)
    return full


def _parse_box(pid: str, path: str, text: str) -> tuple[int, int, int, int, int, int]:
    parts = [p for p in re.split(r"[\s,;]+", text) if p]
    try:
        box = tuple(int(p) for p in parts)
    except ValueError:
        box = ()
    if len(box) != 6 or box[0] > box[1] or box[2] > box[3] or box[4] > box[5] or min(box) < 0:
        raise BadCaseError(pid, path, f"invalid box {text!r} (expected z0 z1 y0 y1 x0 x1, inclusive)")
    return box
