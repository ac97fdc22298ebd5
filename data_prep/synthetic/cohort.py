"""Cohort assembly: plan, per-patient generation, BreastDCEDL file names, NIfTI and CSV output."""

from __future__ import annotations

import csv
import dataclasses
import gzip
import math
import pathlib
import sys
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from tqdm import tqdm

from data_prep.synthetic.anatomy import render_patient
from data_prep.synthetic.planted import (
    SITES,
    PlantedParams,
    oracle_score,
    sample_clinical,
    sample_planted_params,
    xy_spacing_mm,
)
from her2jax.errors import InvalidSetting

METADATA_COLUMNS: tuple[str, ...] = (
    "pid", "pCR", "n_xy", "n_z", "n_times", "pre", "post_early", "post_late", "slice_thick",
    "xy_spacing", "mask_start", "mask_end", "sraw", "eraw", "scol", "ecol", "tum_vol", "age",
    "menopause", "race_white", "race_black", "HR", "HER2", "HR_HER2_STATUS", "TripleNeg",
    "HER2pos", "HRposHER2neg", "dataset", "test",
)

PREVALENCE = 0.25
SPLIT_TRAIN, SPLIT_TEST, SPLIT_VALIDATION = 0, 1, 2
MIN_SIZE = 32
MIN_SLICES = 12


@dataclass(frozen=True)
class PatientPlan:
    """Cohort-level assignment of one patient: index, pid, site, label and split."""

    index: int
    pid: str
    site: str
    her2: int
    split: int


@dataclass(frozen=True)
class SyntheticPatient:
    """One generated patient held in memory.

    Attributes:
        phases: (T, Z, Y, X) float32 integer-valued scanner intensities in [0, 65535].
        mask: (Z, Y, X) int32 tumour mask in {0, 1}.
        row: the patient's ``metadata.csv`` row, keyed by :data:`METADATA_COLUMNS`.
        params: the planted parameters.
    """

    phases: np.ndarray
    mask: np.ndarray
    row: dict[str, object]
    params: PlantedParams


def patient_rng(seed: int, index: int) -> np.random.Generator:
    """Generator of patient ``index``: ``SeedSequence(seed, spawn_key=(1, index))``."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, index)))


def _cohort_rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))


def mask_extent(mask: np.ndarray) -> dict[str, int]:
    """Inclusive bounding box of a (Z, Y, X) mask as mask_start/end, sraw/eraw, scol/ecol."""
    extent = {}
    names = (("mask_start", "mask_end"), ("sraw", "eraw"), ("scol", "ecol"))
    for axis, (first, last) in enumerate(names):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        extent[first], extent[last] = int(hits[0]), int(hits[-1])
    return extent


def pid_for(index: int, site: str) -> str:
    """Patient id, e.g. ``SYN-A-0007`` for patient 7 of site synthetic_a."""
    return f"SYN-{SITES[site].letter}-{index:04d}"


def generate_patient(seed: int, index: int, her2: int, site: str, size: int = 128,
                     slices: int = 32, split: int = SPLIT_TRAIN) -> SyntheticPatient:
    """Generate one patient in memory (nothing is written).

    Everything random comes from :func:`patient_rng` (seed, index), so the same arguments give
    identical arrays. ``split`` only fills the row's ``test`` column.
    """
    _check_shape(size, slices)
    rng = patient_rng(seed, index)
    params = sample_planted_params(her2, site, rng)
    clinical = sample_clinical(her2, rng)
    phases, mask = render_patient(params, size, slices, rng)
    profile = SITES[site]
    row: dict[str, object] = {
        "pid": pid_for(index, site),
        "n_xy": size,
        "n_z": slices,
        "n_times": len(profile.times_s),
        "pre": 0,
        "post_early": profile.post_early,
        "post_late": len(profile.times_s) - 1,
        "slice_thick": params.slice_thick_mm,
        "xy_spacing": round(xy_spacing_mm(params, size), 4),
        **mask_extent(mask),
        "tum_vol": int(mask.sum()),
        **clinical,
        "dataset": site,
        "test": int(split),
    }
    return SyntheticPatient(phases, mask, {c: row[c] for c in METADATA_COLUMNS}, params)


def _split_sizes(n: int) -> tuple[int, int]:
    """(test, validation) counts for a class of n patients: 15% each, at least 1 when n >= 3."""
    held_out = int(math.floor(0.15 * n + 0.5))
    if n >= 3:
        held_out = max(held_out, 1)
    return held_out, held_out


def plan_cohort(patients: int, seed: int) -> list[PatientPlan]:
    """Assign sites, HER2 labels and splits for a cohort of ``patients``.

    Exactly ``round(0.25 * patients)`` positives; sites balanced round-robin; both shuffled by
    the seed. Splits (0 train, 1 test, 2 validation) are 70/15/15 within each label.
    """
    if patients < 1:
        raise InvalidSetting(f"patients must be >= 1, got {patients}")
    rng = _cohort_rng(seed)
    n_pos = round(PREVALENCE * patients)
    labels = rng.permutation(np.r_[np.ones(n_pos, int), np.zeros(patients - n_pos, int)])
    names = list(SITES)
    sites = rng.permutation([names[i % len(names)] for i in range(patients)])
    splits = np.full(patients, SPLIT_TRAIN)
    for label in (0, 1):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_test, n_val = _split_sizes(len(members))
        splits[members[:n_test]] = SPLIT_TEST
        splits[members[n_test:n_test + n_val]] = SPLIT_VALIDATION
    return [
        PatientPlan(i, pid_for(i, str(sites[i])), str(sites[i]), int(labels[i]), int(splits[i]))
        for i in range(patients)
    ]


def image_paths(out_dir: pathlib.Path, pid: str, site: str,
                n_times: int) -> tuple[list[pathlib.Path], pathlib.Path]:
    """DCE file paths (t = 0 .. n_times-1) and mask path of a patient, per the site's naming."""
    out_dir = pathlib.Path(out_dir)
    if SITES[site].naming == "spy1":
        dce = [out_dir / "dce" / f"{pid}_spy1_vis1_acq{t}.nii.gz" for t in range(n_times)]
        return dce, out_dir / "mask" / f"{pid}_spy1_vis1_mask.nii.gz"
    dce = [out_dir / "dce" / f"{pid}_spy2_vis1_dce_aqc_{t}.nii.gz" for t in range(n_times)]
    return dce, out_dir / "mask" / f"{pid}_spy2_vis1_mask.nii.gz"


def save_nifti(array: np.ndarray, path: pathlib.Path) -> None:
    """Save ``array`` as-is with an identity affine (the BreastDCEDL trap), gzip level 1."""
    data = nib.Nifti1Image(array, np.eye(4)).to_bytes()
    pathlib.Path(path).write_bytes(gzip.compress(data, compresslevel=1, mtime=0))


def _ground_truth_row(plan: PatientPlan, patient: SyntheticPatient) -> dict[str, object]:
    row: dict[str, object] = {"pid": plan.pid, "HER2": plan.her2, "site": plan.site,
                              "index": plan.index, "test": plan.split,
                              "times_s": ";".join(f"{t:g}" for t in patient.params.times_s)}
    for field in dataclasses.fields(PlantedParams):
        if field.name in ("her2", "site"):
            continue
        value = getattr(patient.params, field.name)
        row[field.name] = ";".join(f"{v:.6g}" for v in value) if isinstance(value, tuple) else value
    row["oracle_score"] = oracle_score(patient.params)
    return row


def _write_csv(path: pathlib.Path, rows: list[dict[str, object]], columns: Sequence[str]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


def _check_shape(size: int, slices: int) -> None:
    if size < MIN_SIZE:
        raise InvalidSetting(f"size must be >= {MIN_SIZE} pixels, got {size}")
    if slices < MIN_SLICES:
        raise InvalidSetting(f"slices must be >= {MIN_SLICES}, got {slices}")


def generate_cohort(out_dir: str | pathlib.Path, patients: int = 40, seed: int = 0,
                    size: int = 128, slices: int = 32, progress: bool = True) -> pathlib.Path:
    """Write a synthetic cohort to ``out_dir`` and return the path of ``metadata.csv``.

    Writes ``dce/``, ``mask/``, ``metadata.csv`` and ``ground_truth.csv`` (see the package
    docstring); existing files of the same names are overwritten.
    """
    if patients < 1:
        raise InvalidSetting(f"patients must be >= 1, got {patients}")
    if seed < 0:
        raise InvalidSetting(f"seed must be >= 0, got {seed}")
    _check_shape(size, slices)
    out = pathlib.Path(out_dir)
    (out / "dce").mkdir(parents=True, exist_ok=True)
    (out / "mask").mkdir(parents=True, exist_ok=True)
    rows, truth = [], []
    plans = plan_cohort(patients, seed)
    # zlib releases the GIL: compressing patient i in threads overlaps rendering patient i + 1.
    with ThreadPoolExecutor(max_workers=2) as writer:
        previous: list[Future] = []
        for plan in tqdm(plans, desc="synthetic cohort", unit="patient", file=sys.stderr,
                         disable=not progress):
            patient = generate_patient(seed, plan.index, plan.her2, plan.site, size, slices,
                                       plan.split)
            dce_paths, mask_path = image_paths(out, plan.pid, plan.site, len(patient.phases))
            jobs = zip([*patient.phases, patient.mask], [*dce_paths, mask_path])
            pending = [writer.submit(save_nifti, array, path) for array, path in jobs]
            for future in previous:
                future.result()
            previous = pending
            rows.append(patient.row)
            truth.append(_ground_truth_row(plan, patient))
        for future in previous:
            future.result()
    csv_path = out / "metadata.csv"
    _write_csv(csv_path, rows, METADATA_COLUMNS)
    _write_csv(out / "ground_truth.csv", truth, list(truth[0]))
    return csv_path
