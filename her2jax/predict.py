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
import sys

from etils import epath

from her2jax import files
from her2jax.analysis.prediction import LAYOUTS, breastdcedl_patient, identity_affine, predict
from her2jax.errors import UserError


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
    print(files.json_text(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
