"""Prediction for one new study (the library behind `python -m her2jax.predict`): the three phases
read as the run's training data was read, prepared with the run's own parameters, and scored
through the shared inference path; slice probabilities and the patient's aggregate.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from etils import epath

from her2jax import files
from her2jax.analysis import evaluation, metrics
from her2jax.errors import BadInput, InvalidSetting


def preparation_params(preparation: dict[str, Any]):
    """The run's recorded preparation as `data_prep.params.PrepParams` (lists back to tuples;
    the cohort and fit source do not apply to a single study)."""
    from data_prep.params import PrepParams

    return PrepParams.from_dict(preparation, external=None, fit_from=None)


LAYOUTS = {"breastdcedl": "arrays stored (z, y, x) with an identity affine, as BreastDCEDL "
                          "writes them",
           "standard": "each file's own header geometry"}


def identity_affine(path: str) -> bool:
    """A NIfTI file whose affine is the identity (1 mm voxels, no orientation), as BreastDCEDL's."""
    if not path.lower().endswith((".nii", ".nii.gz")):
        return False
    try:
        import nibabel as nib

        affine = nib.load(path).affine
    except Exception:  # the reader reports unreadable files, with the patient and the file
        return False
    return bool(np.allclose(affine, np.eye(4)))


def breastdcedl_patient(path: str) -> str | None:
    """The patient id of a file named the BreastDCEDL way (`<pid>_spy2_vis1_dce_aqc_0.nii.gz`,
    `<pid>_spy1_vis1_acq2.nii.gz`, `<pid>_duke_aqc_1.nii.gz`), else None."""
    from data_prep.sources.breastdcedl import PHASE_FILE

    match = PHASE_FILE.match(epath.Path(path).name)
    return match["pid"] if match else None


def run_layout(restored: Any) -> str | None:
    """How the run's training data was read ("breastdcedl" or "standard"), from its dataset's
    record; None when that record cannot be read (a moved or deleted dataset)."""
    from her2jax.data import pipeline as input_pipeline

    try:
        source = input_pipeline.preparation_metadata(restored.config.data_dir).get("source") or {}
    except (OSError, ValueError):
        return None
    layout = source.get("layout") or ("breastdcedl" if source.get("kind") == "breastdcedl"
                                      else "standard" if source.get("kind") else None)
    return layout if layout in LAYOUTS else None


def choose_layout(restored: Any, pre: str, layout: str | None) -> tuple[str, str]:
    """(layout, where it came from: "flag", "run" or "file") for reading the study's files.

    Refuses, in one line, a file whose orientation nothing decides, and a BreastDCEDL file that
    would be read with its placeholder header."""
    if layout is not None and layout not in LAYOUTS:
        raise InvalidSetting(f"--layout {layout}: expected one of {', '.join(LAYOUTS)}")
    chosen, origin = (layout, "flag") if layout else (run_layout(restored), "run")
    placeholder = identity_affine(pre)
    if chosen is None:
        if placeholder:
            raise InvalidSetting(
                f"{pre}: orientation is ambiguous: an identity affine (no orientation, 1 mm "
                f"voxels) and no record of how run {restored.workdir}'s training data was read "
                f"({restored.config.data_dir}/metadata.json unreadable): pass --layout "
                f"breastdcedl ({LAYOUTS['breastdcedl']}) or --layout standard "
                f"({LAYOUTS['standard']})")
        chosen, origin = "standard", "file"
    if chosen == "standard" and placeholder and breastdcedl_patient(pre):
        why = ("--layout standard" if origin == "flag" else
               "the run was trained on files with their own geometry")
        raise InvalidSetting(
            f"{pre}: a BreastDCEDL file (its name and identity affine) would be read with its "
            f"placeholder header ({why}), i.e. slices along the wrong axis: pass --layout "
            f"breastdcedl")
    return chosen, origin


def prepare_study(restored: Any, *, pre: str, early: str, late: str, mask: str | None = None,
                  box: tuple[int, ...] | None = None, layout: str = "standard",
                  spacing: tuple[float, float, float] | None = None,
                  patient_id: str = "patient"):
    """The study's fused slices, prepared like the run's training data."""
    from data_prep import normalization, pipeline
    from data_prep.sources import Case
    from her2jax.data import pipeline as input_pipeline

    if (mask is None) == (box is None):
        raise InvalidSetting("give the tumour as --mask FILE or --box z0,z1,y0,y1,x0,x1 "
                             "(one of them)")
    params = preparation_params(restored.preparation)
    fitted = None
    if normalization.get(params.normalization).needs_fit:
        data_dir = restored.config.data_dir
        fitted = input_pipeline.preparation_metadata(data_dir).get("normalization_fit")
        if fitted is None:
            raise BadInput(f"{params.normalization} needs the parameters fitted on the training "
                           f"data, and {data_dir}/metadata.json has none")
    case = Case(patient_id=patient_id, label=0, cohort="predict", phases=(pre, early, late),
                mask=mask, box=tuple(box) if box else None,
                stored_zyx=layout == "breastdcedl", spacing=spacing)
    return pipeline.prepare_case(case, params, fitted)


def predict(workdir: str, *, pre: str, early: str, late: str, mask: str | None = None,
            box: tuple[int, ...] | None = None, layout: str | None = None,
            spacing: tuple[float, float, float] | None = None, patient_id: str = "patient",
            checkpoint: str = "best", out: str | None = None, explain: bool = False,
            progress: bool = False) -> dict[str, Any]:
    from data_prep.errors import BadCaseError
    from her2jax.run_folder import RunFolder
    from her2jax.training import inference

    restored = RunFolder(workdir).restore(checkpoint)
    layout, layout_from = choose_layout(restored, pre, layout)
    try:
        prepared = prepare_study(restored, pre=pre, early=early, late=late, mask=mask, box=box,
                                 layout=layout, spacing=spacing, patient_id=patient_id)
    except BadCaseError as error:
        raise BadInput(str(error)) from None
    images = np.stack([s.image for s in prepared.slices])
    probabilities = inference.Predictor.of(restored.model,
                                           dtype=restored.config.dtype).images(images)
    aggregation = restored.config.eval.aggregation
    _, patient, _ = metrics.aggregate_patients([patient_id] * len(images), probabilities,
                                               np.zeros(len(images), int), method=aggregation)
    chosen = evaluation.validation_threshold(restored, aggregation=aggregation, batch_size=64,
                                             progress=progress)
    probability = float(patient[0])
    result = {
        "patient_id": patient_id, "probability": probability,
        "decision": "HER2-positive" if probability >= chosen["threshold"] else "HER2-negative",
        "threshold": chosen["threshold"], "threshold_source": (
            f"Youden's J on {chosen['split']} ({chosen['patients']} patients)"
            + (f"; {chosen['note']}" if chosen.get("note") else "")),
        "aggregation": aggregation,
        "slices": [{"slice_index": int(s.slice_index), "probability": float(p)}
                   for s, p in zip(prepared.slices, probabilities)],
        "run": str(workdir), "checkpoint": restored.checkpoint, "step": restored.step,
        "inputs": {"pre": pre, "early": early, "late": late, "mask": mask,
                   "box": list(box) if box else None, "layout": layout,
                   "layout_from": layout_from},
    }
    if out:
        folder = epath.Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        if explain:
            from her2jax.analysis import explanation

            result["explanations"] = explanation.write_overlays(
                restored.model, images, np.stack([s.mask[..., 0] for s in prepared.slices]),
                folder, names=[f"{patient_id}_slice{s.slice_index:03d}"
                               for s in prepared.slices],
                titles=[f"{patient_id} z={s.slice_index} p={p:.2f}"
                        for s, p in zip(prepared.slices, probabilities)])
        files.write_json(folder / "prediction.json", result, indent=2)
    return result
