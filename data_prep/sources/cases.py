"""The uniform record of a source: `Case` (one patient, ready to be read), `Listing` (what a
source holds) and the rules every source applies to its metadata (labels, duplicate ids, cohorts).
"""
from __future__ import annotations

import collections
import dataclasses

from data_prep.errors import BadCaseError


@dataclasses.dataclass(frozen=True)
class Case:
    """One patient, ready to be read.

    phases: paths of the pre, early and late phase (NIfTI file or DICOM series folder).
    mask: tumour mask path, or None when only `box` is known.
    box: tumour box (z0, z1, y0, y1, x0, x1), voxel indices, inclusive; used when mask is None.
    stored_zyx: the NIfTI arrays were written (z, y, x) with an identity affine (BreastDCEDL).
    spacing: real (z, y, x) spacing in mm when the files' headers do not carry it, else None.
    split: train, validation, test or external; None lets the seeded split rule decide.
    tumour_range: the metadata's own first and last tumour slice (z0, z1), when a mask is given
        too: the mask wins, a disagreement is recorded in the report.
    """

    patient_id: str
    label: int
    cohort: str
    phases: tuple[str, str, str]
    mask: str | None = None
    box: tuple[int, int, int, int, int, int] | None = None
    stored_zyx: bool = False
    spacing: tuple[float, float, float] | None = None
    split: str | None = None
    tumour_range: tuple[int, int] | None = None


@dataclasses.dataclass
class Listing:
    """What a source holds: good cases, per-patient problems, and notes for the report.

    excluded: rows left out by rule, not errors ({patient_id, reason}): a patient without a HER2
        status, a cohort not selected. Counted by reason in the report.
    release: which release of a known dataset the source is (e.g. "mincrop"), or None.
    layout: how its NIfTI arrays are stored: "breastdcedl" ((z, y, x), identity affine) or
        "standard" (each file's own header geometry).
    phase_rules: patient id -> how its pre/early/late files were chosen, where a rule chose.
    """

    kind: str
    cases: list[Case]
    problems: list[BadCaseError] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    excluded: list[dict[str, str]] = dataclasses.field(default_factory=list)
    release: str | None = None
    layout: str = "standard"
    phase_rules: dict[str, str] = dataclasses.field(default_factory=dict)

    def exclude(self, patient_id: str, reason: str) -> None:
        self.excluded.append({"patient_id": patient_id, "reason": reason})

    def excluded_counts(self) -> dict[str, int]:
        return dict(sorted(collections.Counter(e["reason"] for e in self.excluded).items()))


def parse_label(patient_id: str, path: str, raw: str | None) -> int:
    """Accepts 0/1 (also '0.0'/'1.0') and HER2-/HER2+ / negative/positive."""
    text = (raw or "").strip().lower()
    if text in ("", "nan", "na", "none"):
        raise BadCaseError(patient_id, path, "missing HER2 label")
    aliases = {"her2-": 0, "her2+": 1, "negative": 0, "positive": 1, "neg": 0, "pos": 1}
    if text in aliases:
        return aliases[text]
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value not in (0.0, 1.0):
        raise BadCaseError(patient_id, path, f"invalid HER2 label {raw!r} (expected 0 or 1)")
    return int(value)


def reject_duplicates(listing: Listing, path: str) -> None:
    """Moves every patient whose id occurs more than once into problems: neither copy is trusted,
    also when one of the rows was a problem already (the other is not kept)."""
    counts = collections.Counter(case.patient_id for case in listing.cases)
    counts.update(problem.patient_id for problem in listing.problems)
    duplicated = {pid for pid, n in counts.items()
                  if n > 1 and pid in {case.patient_id for case in listing.cases}}
    for pid in sorted(duplicated):
        listing.problems.append(BadCaseError(pid, path, f"duplicate patient id ({counts[pid]} rows)"))
    listing.cases = [case for case in listing.cases if case.patient_id not in duplicated]


def cohort_reason(cohort: str, selected: tuple[str, ...]) -> str:
    return f"cohort {cohort} not selected (--cohorts {','.join(selected)})"
