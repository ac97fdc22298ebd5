"""Reading image volumes (NIfTI files, DICOM series folders) into (z, y, x) float32 arrays.

Every reader returns `Volume(array, spacing)`, with `array` indexed (z, y, x) and `spacing` in mm
in the same order. Anything that goes wrong becomes a `BadCaseError` naming patient and file.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import SimpleITK as sitk

from data_prep.errors import BadCaseError


@dataclasses.dataclass
class Volume:
    array: np.ndarray                       # (z, y, x)
    spacing: tuple[float, float, float]     # mm, (z, y, x)


def read_volume(patient_id: str, path: str, stored_zyx: bool = False) -> Volume:
    """Reads a NIfTI file or a DICOM series folder.

    `stored_zyx=True` is for BreastDCEDL files: their arrays were written (z, y, x) into the NIfTI
    index order with an identity affine, so SimpleITK's (k, j, i) array has the slice axis LAST;
    reversing the axes gives (z, y, x) back. The header spacing of those files is a placeholder
    (1 mm); the caller takes the real spacing from the metadata CSV.
    """
    if not os.path.exists(path):
        raise BadCaseError(patient_id, path, "file not found")
    try:
        image = _read_dicom_series(path) if os.path.isdir(path) else sitk.ReadImage(path)
        array = sitk.GetArrayFromImage(image)
    except BadCaseError:
        raise
    except Exception as error:  # SimpleITK raises RuntimeError with a multi-line ITK trace
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise BadCaseError(patient_id, path, f"unreadable image ({reason[:200]})") from None
    spacing = tuple(float(s) for s in reversed(image.GetSpacing()))
    if array.ndim != 3:
        raise BadCaseError(patient_id, path, f"expected a 3-D volume, got shape {array.shape}")
    if stored_zyx:
        array = array.transpose(2, 1, 0)
        spacing = spacing[::-1]
    return Volume(np.ascontiguousarray(array), spacing)


def _read_dicom_series(folder: str) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(folder)
    if not series:
        raise ValueError("no DICOM series in folder")
    if len(series) > 1:
        raise ValueError(f"{len(series)} DICOM series in one folder; expected one per phase")
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(folder, series[0]))
    return reader.Execute()


def check_intensities(patient_id: str, path: str, array: np.ndarray) -> np.ndarray:
    """Returns the array as float32, rejecting NaN/inf voxels and constant volumes."""
    array = np.asarray(array, dtype=np.float32)
    finite = np.isfinite(array)
    if not finite.all():
        raise BadCaseError(patient_id, path, f"{int((~finite).sum())} NaN/inf voxels")
    if array.min() == array.max():
        raise BadCaseError(patient_id, path, f"constant volume (every voxel is {array.min():g})")
    return array
