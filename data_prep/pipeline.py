"""One patient from files on disk to fused, cropped, 8-bit slices. Runs in worker processes.

    read pre/early/late + mask  ->  checks  ->  [N4]  ->  normalise to 8 bit (whole volume)
      ->  tumour slices  ->  one square crop per patient  ->  fuse RGB  ->  resize

This module imports neither TensorFlow nor JAX, so worker processes start light.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from data_prep import n4, normalization, slices
from data_prep.errors import BadCaseError
from data_prep.params import PrepParams
from data_prep.sources import Case
from data_prep.volumes import check_intensities, read_volume


@dataclasses.dataclass
class Loaded:
    phases: np.ndarray                   # float32 (3, z, y, x)
    mask: np.ndarray                     # uint8 (z, y, x); zeros when only a box is known
    tumour_box: tuple[int, ...]          # (z0, z1, y0, y1, x0, x1), inclusive
    spacing: tuple[float, float, float]


@dataclasses.dataclass
class PreparedSlice:
    slice_index: int
    image: np.ndarray                    # uint8 (size, size, 3)
    mask: np.ndarray                     # uint8 (size, size, 1)


@dataclasses.dataclass
class PreparedCase:
    case: Case
    slices: list[PreparedSlice]


def load_case(case: Case, params: PrepParams) -> Loaded:
    """Reads and checks the three phases and the tumour region; applies N4 when asked."""
    volumes = [read_volume(case.patient_id, path, case.stored_zyx) for path in case.phases]
    shape = volumes[0].array.shape
    for path, volume in zip(case.phases[1:], volumes[1:]):
        if volume.array.shape != shape:
            raise BadCaseError(case.patient_id, path, f"phases of different shapes: "
                                                      f"{volume.array.shape} vs pre {shape}")
    phases = np.stack([check_intensities(case.patient_id, path, v.array)
                       for path, v in zip(case.phases, volumes)])
    spacing = case.spacing or volumes[0].spacing
    mask, box = _tumour_region(case, shape)
    if params.n4:
        phases = n4.correct_phases(phases, spacing, params.n4_shrink, params.n4_iterations)
    return Loaded(phases, mask, box, spacing)


def _tumour_region(case: Case, shape: tuple[int, ...]) -> tuple[np.ndarray, tuple[int, ...]]:
    if case.mask is None:
        z0, z1, y0, y1, x0, x1 = case.box
        if z1 >= shape[0] or y1 >= shape[1] or x1 >= shape[2]:
            raise BadCaseError(case.patient_id, case.phases[0],
                               f"tumour box {case.box} outside the volume of shape {shape}")
        return np.zeros(shape, np.uint8), case.box
    mask = read_volume(case.patient_id, case.mask, case.stored_zyx).array
    if mask.shape != shape:
        raise BadCaseError(case.patient_id, case.mask,
                           f"mask shape mismatch: {mask.shape} vs phases {shape}")
    mask = (mask > 0).astype(np.uint8)
    if not mask.any():
        raise BadCaseError(case.patient_id, case.mask, "empty tumour mask")
    z = np.nonzero(mask.any(axis=(1, 2)))[0]
    return mask, (int(z[0]), int(z[-1])) + slices.in_plane_box(mask, list(z))


def summarize_case(case: Case, params: PrepParams) -> Any:
    """The normalisation's per-case summary (e.g. Nyul landmarks), for fitting on training cases."""
    strategy = normalization.get(params.normalization)
    return strategy.summarize(load_case(case, params).phases)


def prepare_case(case: Case, params: PrepParams,
                 fitted: Mapping[str, Any] | None = None) -> PreparedCase:
    """The patient's fused, cropped and resized slices, ready to be written."""
    loaded = load_case(case, params)
    eight_bit = normalization.get(params.normalization).apply(loaded.phases, fitted)
    z0, z1, y0, y1, x0, x1 = loaded.tumour_box
    chosen = slices.tumour_slices(z0, z1, params.slices_per_patient)
    box = slices.in_plane_box(loaded.mask, chosen) if loaded.mask[chosen].any() else (y0, y1, x0, x1)
    top, left, side = slices.square_window(box, params.crop_margin)
    prepared = []
    for z in chosen:
        image = slices.cut(slices.fuse(eight_bit, z), top, left, side)
        mask = slices.cut(loaded.mask[z][..., None], top, left, side)
        prepared.append(PreparedSlice(
            z, slices.resize(image, params.image_size),
            slices.resize(mask, params.image_size, nearest=True)))
    return PreparedCase(case, prepared)
