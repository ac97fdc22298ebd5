"""HER2 status of one new patient: `python -m her2jax.predict --workdir RUN --pre F --early F
--late F --mask F [--out DIR] [--explain]`.

Each phase is a NIfTI file, an NRRD/MetaImage file or a DICOM series folder; the tumour is a mask
volume (`--mask`) or a box (`--box z0,z1,y0,y1,x0,x1`, voxel indices, inclusive). NIfTI files are
read the way the run's training data was read (its dataset's record): BreastDCEDL files, stored
(z, y, x) with an identity affine, for a run trained on BreastDCEDL; files with their own header
geometry otherwise. `--layout` says it explicitly; a file whose orientation nothing decides (an
identity affine, and no record of the run's data) is refused, as is a BreastDCEDL file about to be
read with its placeholder header (the slices would come from the wrong axis). The study goes
through exactly the preparation code the training data went through (`data_prep.pipeline`, with
the run's recorded parameters and the normalisation fitted on its training split), then the
model. Prints JSON and writes `prediction.json` (and with `--explain`, overlays) to --out:
    probability       HER2-positive probability of the patient (slices aggregated as in training)
    decision          "HER2-positive" / "HER2-negative" at the validation threshold
    threshold         that threshold (Youden's J on the run's validation split)
    slices            each slice used: index in the volume and its probability
A research tool: not a medical device.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np
from etils import epath

from her2jax import metrics
from her2jax.errors import BadInput, InvalidSetting, UserError


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
    from her2jax import input_pipeline

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
    from her2jax import input_pipeline

    if (mask is None) == (box is None):
        raise InvalidSetting("give the tumour as --mask FILE or --box z0,z1,y0,y1,x0,x1 (one of them)")
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
    from her2jax import evaluate, inference
    from her2jax.run_folder import RunFolder

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
    chosen = evaluate.validation_threshold(restored, aggregation=aggregation, batch_size=64,
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
            from her2jax import explain as explain_lib

            result["explanations"] = explain_lib.write_overlays(
                restored.model, images, np.stack([s.mask[..., 0] for s in prepared.slices]),
                folder, names=[f"{patient_id}_slice{s.slice_index:03d}"
                               for s in prepared.slices],
                titles=[f"{patient_id} z={s.slice_index} p={p:.2f}"
                        for s, p in zip(prepared.slices, probabilities)])
        (folder / "prediction.json").write_text(json.dumps(result, indent=2))
    return result


def _numbers(kind: type, count: int):
    def parse(text: str) -> tuple:
        try:
            values = tuple(kind(part) for part in text.split(","))
        except ValueError:
            values = ()
        if len(values) != count:
            raise argparse.ArgumentTypeError(f"expected {count} comma-separated numbers, got "
                                             f"{text!r}")
        return values
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m her2jax.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="trained run folder")
    parser.add_argument("--pre", required=True, help="pre-contrast phase")
    parser.add_argument("--early", required=True, help="early post-contrast phase")
    parser.add_argument("--late", required=True, help="late post-contrast phase")
    parser.add_argument("--mask", help="tumour mask volume (non-zero = tumour)")
    parser.add_argument("--box", type=_numbers(int, 6), help="tumour box z0,z1,y0,y1,x0,x1")
    parser.add_argument("--layout", choices=tuple(LAYOUTS), default=None,
                        help="how to read NIfTI files: breastdcedl (arrays stored (z, y, x) with "
                             "an identity affine, as in the BreastDCEDL release) or standard (the "
                             "file's own header geometry); default: as the run's training data "
                             "was read")
    parser.add_argument("--spacing", type=_numbers(float, 3),
                        help="z,y,x spacing in mm when the headers lack it (used by N4)")
    parser.add_argument("--patient_id", help="name in messages and prediction.json (default: "
                                               "the --pre file's name)")
    parser.add_argument("--checkpoint", default="best")
    parser.add_argument("--out", help="folder for prediction.json (and overlays)")
    parser.add_argument("--explain", action="store_true",
                        help="write heat-map overlays of each slice to --out")
    args = parser.parse_args(argv)
    if args.explain and not args.out:
        parser.error("--explain writes images: give --out")
    box = args.box
    if box and (min(box) < 0 or box[0] > box[1] or box[2] > box[3] or box[4] > box[5]):
        parser.error(f"--box {','.join(map(str, box))}: expected z0,z1,y0,y1,x0,x1 with each "
                     f"first index <= the second (inclusive) and none negative")
    return args


def layout_warning(path: str, layout: str) -> str | None:
    """A warning when a NIfTI file to be read with its own geometry has an identity affine (1 mm
    voxels, no orientation), as BreastDCEDL's files have (stored (z, y, x))."""
    if layout != "standard" or not identity_affine(path):
        return None
    return (f"warning: {path} has an identity affine (1 mm voxels, no orientation), as the "
            f"BreastDCEDL files have; if it is one of them, its array is stored (z, y, x): add "
            f"--layout breastdcedl")


def file_stem(path: str) -> str:
    """The default patient id: `.../T-006_pre.nii.gz` -> `T-006_pre`; a BreastDCEDL file's
    patient (`ISPY2-123_spy2_vis1_dce_aqc_0.nii.gz` -> `ISPY2-123`)."""
    patient = breastdcedl_patient(path)
    if patient:
        return patient
    name = epath.Path(path).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            return name[:-len(suffix)]
    return name


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.patient_id = args.patient_id or file_stem(args.pre)
    try:
        result = predict(args.workdir, pre=args.pre, early=args.early, late=args.late,
                         mask=args.mask, box=args.box, layout=args.layout, spacing=args.spacing,
                         patient_id=args.patient_id, checkpoint=args.checkpoint, out=args.out,
                         explain=args.explain)
    except (UserError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    warning = layout_warning(args.pre, result["inputs"]["layout"])
    if warning:
        print(warning, file=sys.stderr)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
