"""One patient from files on disk to fused, cropped, 8-bit slices. Runs in worker processes.

    read pre/early/late + mask  ->  checks  ->  [N4]  ->  normalise to 8 bit (whole volume)
      ->  tumour slices  ->  one square crop per patient  ->  fuse RGB  ->  resize

A normalisation fitted on the training split (Nyul) needs every training case twice: once for the
fit, once to be written. When the strategy can be applied from the case's summary
(`apply_summarized`), the fit pass also keeps what the write pass needs - the corrected voxels of
the chosen slices inside the crop window, the crop of the mask and the summary - in a folder of
`spill_dir`, so the write pass neither reads the files nor runs N4 again. The output is the same,
voxel for voxel (tests/test_pipeline_spill.py).

This module imports neither TensorFlow nor JAX, so worker processes start light.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Mapping

import numpy as np

from data_prep import n4, normalization, slices
from data_prep.errors import BadCaseError
from data_prep.params import PrepParams, crop_size_of
from data_prep.sources import Case
from data_prep.volumes import Volume, check_intensities, read_volume


@dataclasses.dataclass
class Loaded:
    phases: np.ndarray                   # float32 (3, z, y, x)
    mask: np.ndarray                     # uint8 (z, y, x); zeros when only a box is known
    tumour_box: tuple[int, ...]          # (z0, z1, y0, y1, x0, x1), inclusive
    spacing: tuple[float, float, float]
    notes: list[str] = dataclasses.field(default_factory=list)   # for the report


@dataclasses.dataclass
class PreparedSlice:
    slice_index: int
    image: np.ndarray                    # uint8 (size, size, 3)
    mask: np.ndarray                     # uint8 (size, size, 1)


@dataclasses.dataclass
class PreparedCase:
    case: Case
    slices: list[PreparedSlice]
    notes: list[str] = dataclasses.field(default_factory=list)   # for the report


def load_case(case: Case, params: PrepParams) -> Loaded:
    """Reads and checks the three phases and the tumour region; applies N4 when asked."""
    volumes = [read_volume(case.patient_id, path, case.stored_zyx) for path in case.phases]
    shape = volumes[0].array.shape
    for path, volume in zip(case.phases[1:], volumes[1:]):
        if volume.array.shape != shape:
            raise BadCaseError(case.patient_id, path, f"phases of different shapes: "
                                                      f"{volume.array.shape} vs pre {shape}")
        _check_spacing(case, path, volume, volumes[0], "the pre-contrast phase")
    phases = np.stack([check_intensities(case.patient_id, path, v.array)
                       for path, v in zip(case.phases, volumes)])
    spacing = case.spacing or volumes[0].spacing
    mask, box = _tumour_region(case, shape, volumes[0])
    if params.n4:
        phases = n4.correct_phases(phases, spacing, params.n4_shrink, params.n4_iterations)
    return Loaded(phases, mask, box, spacing, range_notes(case, box))


def range_notes(case: Case, box: tuple[int, ...]) -> list[str]:
    """A note when the metadata's tumour range disagrees with the mask's (the mask wins); the
    patient's error when the two do not overlap at all (a mask of another patient, or the axes
    read in another order)."""
    if case.tumour_range is None or case.mask is None or tuple(box[:2]) == case.tumour_range:
        return []
    first, last = case.tumour_range
    if box[1] < first or last < box[0]:
        raise BadCaseError(case.patient_id, case.mask,
                           f"tumour slices {box[0]}..{box[1]} in the mask and {first}..{last} in "
                           "the metadata do not overlap: a mask of another patient, or the axes "
                           "in another order?")
    return [f"tumour slices {box[0]}..{box[1]} in the mask, {first}..{last} in the metadata: "
            "the mask's are used"]


def _check_spacing(case: Case, path: str, volume: Volume, reference: Volume | None,
                   what: str) -> None:
    """Volumes of one patient share one voxel grid: a different header spacing means a file
    resampled or exported apart (BreastDCEDL headers hold a placeholder: not compared)."""
    if case.stored_zyx or reference is None:
        return
    if not np.allclose(volume.spacing, reference.spacing, rtol=1e-3, atol=1e-4):
        raise BadCaseError(case.patient_id, path, f"voxel spacing {_mm(volume.spacing)}, not the "
                                                  f"{_mm(reference.spacing)} of {what}")


def _mm(spacing: tuple[float, ...]) -> str:
    return "x".join(f"{s:g}" for s in spacing) + " mm"


def _tumour_region(case: Case, shape: tuple[int, ...], reference: Volume | None = None
                   ) -> tuple[np.ndarray, tuple[int, ...]]:
    if case.mask is None:
        z0, z1, y0, y1, x0, x1 = case.box
        if z1 >= shape[0] or y1 >= shape[1] or x1 >= shape[2]:
            raise BadCaseError(case.patient_id, case.phases[0],
                               f"tumour box {case.box} outside the volume of shape {shape}")
        return np.zeros(shape, np.uint8), case.box
    volume = read_volume(case.patient_id, case.mask, case.stored_zyx)
    _check_spacing(case, case.mask, volume, reference, "the phases")
    mask = volume.array
    if mask.shape != shape:
        raise BadCaseError(case.patient_id, case.mask,
                           f"mask shape mismatch: {mask.shape} vs phases {shape}")
    mask = (mask > 0).astype(np.uint8)
    if not mask.any():
        raise BadCaseError(case.patient_id, case.mask, "empty tumour mask")
    z = np.nonzero(mask.any(axis=(1, 2)))[0]
    return mask, (int(z[0]), int(z[-1])) + slices.in_plane_box(mask, list(z))


def summarize_case(case: Case, params: PrepParams, spill_dir: str | None = None) -> Any:
    """The normalisation's per-case summary (e.g. Nyul landmarks), for fitting on training cases.

    With `spill_dir` (only for strategies with `apply_summarized`), also writes there what
    `prepare_case` needs to write this case without reading it again."""
    strategy = normalization.get(params.normalization)
    if strategy.summarize is None:
        raise ValueError(f"normalization {strategy.name!r} is not fitted: it has no summary")
    if spill_dir is not None and strategy.apply_summarized is None:
        raise ValueError(f"normalization {strategy.name!r} cannot be applied from a summary")
    loaded = load_case(case, params)
    summary = strategy.summarize(loaded.phases)
    if spill_dir is not None:
        chosen, (top, left, side) = _window(loaded, params)
        inside = slices.cut(np.ones(loaded.phases.shape[2:], bool), top, left, side)
        voxels = np.stack([[slices.cut(phase[z], top, left, side) for z in chosen]
                           for phase in loaded.phases])
        masks = np.stack([slices.cut(loaded.mask[z], top, left, side) for z in chosen])
        path = spill_path(spill_dir, case.patient_id)
        with open(path + ".partial", "wb") as handle:
            np.savez(handle, summary=np.asarray(summary), chosen=np.asarray(chosen),
                     voxels=voxels, inside=inside, masks=masks,
                     notes=np.asarray(loaded.notes, dtype=str))
        os.replace(path + ".partial", path)
    return summary


def spill_path(spill_dir: str, patient_id: str) -> str:
    """The file in `spill_dir` that holds one patient's fit-pass output."""
    return os.path.join(spill_dir, hashlib.sha1(patient_id.encode()).hexdigest() + ".npz")


def _window(loaded: Loaded, params: PrepParams) -> tuple[list[int], tuple[int, int, int]]:
    """The slices to write and the patient's square crop (top, left, side) around the tumour:
    sized to the tumour (crop "tumour"), or a fixed field of view at native resolution centred
    on it (crop "fixed")."""
    z0, z1, y0, y1, x0, x1 = loaded.tumour_box
    chosen = slices.tumour_slices(z0, z1, params.slices_per_patient)
    box = slices.in_plane_box(loaded.mask, chosen) if loaded.mask[chosen].any() else (y0, y1, x0, x1)
    if params.crop == "fixed":
        return chosen, slices.fixed_window(box, fixed_side(params.crop_size, loaded.spacing))
    return chosen, slices.square_window(box, params.crop_margin)


def fixed_side(crop_size: str, spacing: tuple[float, float, float]) -> int:
    """The fixed field of view's side in pixels: '96px' -> 96; '64mm' -> 64 mm over the mean
    in-plane spacing (y, x), at least 8."""
    size, unit = crop_size_of(crop_size)
    if unit == "mm":
        size /= (float(spacing[1]) + float(spacing[2])) / 2
    return max(8, int(round(size)))


def prepare_case(case: Case, params: PrepParams, fitted: Mapping[str, Any] | None = None,
                 spill_dir: str | None = None) -> PreparedCase:
    """The patient's fused, cropped and resized slices, ready to be written.

    When `spill_dir` holds this patient's fit-pass output (`summarize_case`), it is used instead of
    the files: same result, without reading the volumes or running N4 again."""
    if spill_dir is not None and os.path.isfile(spill_path(spill_dir, case.patient_id)):
        return _prepare_spilled(case, params, fitted, spill_path(spill_dir, case.patient_id))
    loaded = load_case(case, params)
    eight_bit = normalization.get(params.normalization).apply(loaded.phases, fitted)
    chosen, (top, left, side) = _window(loaded, params)
    images = [slices.cut(slices.fuse(eight_bit, z), top, left, side) for z in chosen]
    masks = [slices.cut(loaded.mask[z], top, left, side) for z in chosen]
    return _finish(case, params, chosen, images, masks, loaded.notes)


def _prepare_spilled(case: Case, params: PrepParams, fitted: Mapping[str, Any] | None,
                     path: str) -> PreparedCase:
    strategy = normalization.get(params.normalization)
    with np.load(path) as spilled:
        eight_bit = strategy.apply_summarized(spilled["voxels"], spilled["summary"], fitted)
        eight_bit[:, :, ~spilled["inside"]] = 0      # outside the volume, as `slices.cut` pads
        chosen = [int(z) for z in spilled["chosen"]]
        images = [np.ascontiguousarray(np.moveaxis(eight_bit[:, i], 0, -1))
                  for i in range(len(chosen))]
        masks = list(spilled["masks"])
        notes = [str(note) for note in spilled["notes"]]
    return _finish(case, params, chosen, images, masks, notes)


def _finish(case: Case, params: PrepParams, chosen: list[int], images: list[np.ndarray],
            masks: list[np.ndarray], notes: list[str]) -> PreparedCase:
    """Resizes each (side, side, 3) image and (side, side) mask crop to the output size."""
    return PreparedCase(case, [
        PreparedSlice(z, slices.resize(image, params.image_size),
                      slices.resize(mask[..., None], params.image_size, nearest=True))
        for z, image, mask in zip(chosen, images, masks)], notes)
