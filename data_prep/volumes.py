"""Reading image volumes (NIfTI files, DICOM series folders) into (z, y, x) float32 arrays.

Every reader returns `Volume(array, spacing)`, with `array` indexed (z, y, x) and `spacing` in mm
in the same order. Anything that goes wrong becomes a `BadCaseError` naming patient and file.
"""
from __future__ import annotations

import dataclasses
import os

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from data_prep.errors import BadCaseError
from her2jax.errors import BadInput


@dataclasses.dataclass
class Volume:
    array: np.ndarray                       # (z, y, x)
    spacing: tuple[float, float, float]     # mm, (z, y, x)


LAST_READ: str | None = None     # the file this process read last (`her2_dce._guarded`)


def read_volume(patient_id: str, path: str, stored_zyx: bool = False) -> Volume:
    """Reads a NIfTI file (nibabel), an NRRD or MetaImage file or a DICOM series folder
    (SimpleITK).

    NIfTI voxel order (i, j, k) is reversed to (z, y, x), as SimpleITK's arrays are, except with
    `stored_zyx=True`: BreastDCEDL arrays were written (z, y, x) straight into the NIfTI index
    order with an identity affine, so (i, j, k) already is (z, y, x) (a naive SimpleITK read puts
    the slice axis last). Their header spacing is a placeholder (1 mm); the caller takes the real
    spacing from the metadata CSV. NIfTI is read with nibabel because SimpleITK silently fills a
    truncated data block with zeros and turns NaN/inf voxels into 0, hiding both problems.
    """
    global LAST_READ
    LAST_READ = path          # named by a patient's error that a reader or later step raises
    if not os.path.exists(path):
        raise BadCaseError(patient_id, path, "file not found")
    if os.path.isdir(path):
        reader = _read_dicom_series
    elif path.lower().endswith(ITK_SUFFIXES):
        reader = _read_itk_file
    else:
        reader = _read_nifti
    array, spacing = reader(patient_id, path, stored_zyx)
    if array.ndim != 3:
        raise BadCaseError(patient_id, path, f"expected a 3-D volume, got shape {array.shape}")
    return Volume(np.ascontiguousarray(array), spacing)


def _read_nifti(patient_id: str, path: str, stored_zyx: bool) -> tuple[np.ndarray, tuple]:
    try:
        image = nib.load(path)
    except Exception as error:  # nibabel's errors, reduced to one line with the file
        raise BadCaseError(patient_id, path, f"unreadable image ({_last_line(error)})") from None
    try:
        array = np.asanyarray(image.dataobj)
    except Exception as error:  # EOFError (cut gzip), zlib.error, OSError (short file)
        raise BadCaseError(patient_id, path,
                           f"truncated or corrupt image data ({_last_line(error)})") from None
    spacing = tuple(float(s) for s in image.header.get_zooms()[:3])
    if stored_zyx or array.ndim != 3:
        return array, spacing
    return array.transpose(2, 1, 0), spacing[::-1]


ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")


def _read_itk_file(patient_id: str, path: str, stored_zyx: bool = False) -> tuple:
    """NRRD / MetaImage through SimpleITK; the file's geometry is explicit, as for DICOM."""
    try:
        image = sitk.ReadImage(path)
    except Exception as error:  # ITK's multi-line traces, reduced to one line with the file
        raise BadCaseError(patient_id, path, f"unreadable image ({_last_line(error)})") from None
    return sitk.GetArrayFromImage(image), tuple(float(s) for s in reversed(image.GetSpacing()))


def _last_line(error: Exception) -> str:
    text = str(error).strip()
    return (text.splitlines()[-1] if text else type(error).__name__)[:200]


def _read_dicom_series(patient_id: str, folder: str, stored_zyx: bool = False) -> tuple:
    """One DICOM series per folder; `stored_zyx` does not apply (DICOM geometry is explicit)."""
    try:
        reader = sitk.ImageSeriesReader()
        series = reader.GetGDCMSeriesIDs(folder)
        if not series:
            raise BadInput("no DICOM series in folder")
        if len(series) > 1:
            raise BadInput(f"{len(series)} DICOM series in one folder; expected one per phase")
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(folder, series[0]))
        image = reader.Execute()
    except Exception as error:  # ITK's multi-line traces, reduced to one line with the folder
        raise BadCaseError(patient_id, folder, f"unreadable image ({_last_line(error)})") from None
    return sitk.GetArrayFromImage(image), tuple(float(s) for s in reversed(image.GetSpacing()))


def check_intensities(patient_id: str, path: str, array: np.ndarray) -> np.ndarray:
    """Returns the array as float32, rejecting voxels that are not real numbers (colour,
    complex: a cast would drop channels or the imaginary part), NaN/inf voxels and constant
    volumes."""
    if np.asarray(array).dtype.kind not in "biuf":
        raise BadCaseError(patient_id, path, f"voxels of type {np.asarray(array).dtype} are not "
                           "real numbers (a colour or complex image?)")
    with np.errstate(over="ignore"):            # values beyond float32: inf, refused below
        array = np.asarray(array, dtype=np.float32)
    finite = np.isfinite(array)
    if not finite.all():
        raise BadCaseError(patient_id, path, f"{int((~finite).sum())} NaN/inf voxels")
    if array.min() == array.max():
        raise BadCaseError(patient_id, path, f"constant volume (every voxel is {array.min():g})")
    return array
