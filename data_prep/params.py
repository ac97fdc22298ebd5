"""Every parameter that changes what preparation writes, in one frozen, picklable record.

The record is stored in the dataset's metadata, names the TFDS builder config, and travels to the
worker processes, so a dataset can always be traced back to exactly how it was made.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Any

from her2jax.errors import InvalidSetting

SPLITS = ("train", "validation", "test", "external")
DATASET_NAME = "her2_dce"
DATASET_VERSION = "1.0.0"     # the TFDS builder's version (data_prep.her2_dce.Her2Dce)
# The settings that change what a model sees. A run's training data and any dataset it is
# evaluated on must agree on these (`evaluate.check_preparation`, `prepare --like`); the split
# rule, the cohorts and the fit source may differ.
IMAGE_PARAMETERS = ("normalization", "n4", "n4_shrink", "n4_iterations", "image_size",
                    "slices_per_patient", "crop_margin", "phases", "crop", "crop_size")
CROPS = ("tumour", "fixed")
CROP_SIZE = re.compile(r"(\d+(?:\.\d+)?)(mm|px)")


def crop_size_of(text: str) -> tuple[float, str]:
    """'64mm' -> (64.0, 'mm'), '96px' -> (96.0, 'px')."""
    match = CROP_SIZE.fullmatch(str(text).strip())
    if not match or float(match.group(1)) <= 0:
        raise InvalidSetting(f"crop_size {text!r}: a positive size in millimetres or pixels, "
                             "e.g. 64mm or 96px")
    return float(match.group(1)), match.group(2)


@dataclasses.dataclass(frozen=True)
class PrepParams:
    """Preparation settings.

    normalization: name in `data_prep.normalization.STRATEGIES`.
    n4: N4 bias-field correction before normalisation (the study found it slightly harmful).
    n4_shrink: in-plane shrink factor for estimating the field (applied at full resolution).
    n4_iterations: iterations per fitting level; the number of entries is the number of levels.
    image_size: side of the square output image, pixels.
    slices_per_patient: N central tumour slices; 0 keeps every slice that holds tumour.
    crop_margin: margin added on each side of the tumour box, as a fraction of its longer side
        (crop "tumour").
    crop: "tumour": a square sized to the tumour (box plus margin), so every patient has its own
        zoom and the tumour fills a similar share of each image; "fixed": a square field of view
        of `crop_size` at native resolution around the tumour's centre, so tumour size stays
        visible. Either way the square is then resized to `image_size`.
    crop_size: the fixed field of view's side, "<number>mm" (at the in-plane spacing) or
        "<number>px" (crop "fixed" only).
    phases: (pre, early, late) time-point indices overriding the metadata's, or None.
    split_seed: seed of the patient-level split used when the source gives none.
    split_fractions: (train, validation, test) fractions of that split.
    external: cohort name if the whole source is an external validation set (split `external`).
    fit_from: a prepared dataset whose fitted normalisation (e.g. Nyul landmarks) is reused instead
        of fitting on this source's training split; needed for an external set.
    cohorts: the cohorts to keep (BreastDCEDL's `dataset` column: spy1, spy2, duke; a manifest's
        `cohort` column), or None for all; part of the config name.
    """

    normalization: str = "per_channel_clip_q98"
    n4: bool = False
    n4_shrink: int = 4
    n4_iterations: tuple[int, ...] = (50, 50, 50, 50)
    image_size: int = 224
    slices_per_patient: int = 4
    crop_margin: float = 0.25
    phases: tuple[int, int, int] | None = None
    split_seed: int = 0
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    external: str | None = None
    fit_from: str | None = None
    cohorts: tuple[str, ...] | None = None
    crop: str = "tumour"
    crop_size: str = "64mm"

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise InvalidSetting(f"crop {self.crop!r}: one of {', '.join(CROPS)}")
        side, unit = crop_size_of(self.crop_size)
        if unit == "px" and side < 8:
            raise InvalidSetting(f"crop_size {self.crop_size}: at least 8 pixels")
        if self.image_size < 8:
            raise InvalidSetting(f"image_size must be at least 8 pixels, got {self.image_size}")
        if self.slices_per_patient < 0:
            raise InvalidSetting(f"slices_per_patient must be >= 0, got {self.slices_per_patient}")
        if self.crop_margin < 0:
            raise InvalidSetting(f"crop_margin must be >= 0, got {self.crop_margin}")
        if self.n4_shrink < 1 or not self.n4_iterations or min(self.n4_iterations) < 1:
            raise InvalidSetting("n4_shrink and every n4_iterations entry must be >= 1")
        if len(self.split_fractions) != 3 or abs(sum(self.split_fractions) - 1) > 1e-6 \
                or min(self.split_fractions) < 0:
            raise InvalidSetting(f"split_fractions must be 3 non-negative numbers summing to 1, "
                                 f"got {self.split_fractions}")
        if self.phases is not None and (len(self.phases) != 3 or min(self.phases) < 0):
            raise InvalidSetting(f"phases must be three non-negative indices, got {self.phases}")
        if self.cohorts is not None:
            if not self.cohorts or any(not re.fullmatch(r"[A-Za-z0-9_]+", c) for c in self.cohorts):
                raise InvalidSetting(f"cohorts must be names of letters, digits and _, got "
                                     f"{self.cohorts}")
            if list(self.cohorts) != sorted(set(self.cohorts)):
                raise InvalidSetting(f"cohorts must be sorted and distinct, got {self.cohorts}")

    @classmethod
    def from_dict(cls, record: dict[str, Any], **overrides: Any) -> "PrepParams":
        """The record `to_dict` wrote (a dataset's or a run's preparation, JSON lists for
        tuples), keys that are not fields ignored, `overrides` applied."""
        fields = {key: tuple(value) if isinstance(value, list) else value
                  for key, value in record.items() if key in cls.__dataclass_fields__}
        return cls(**(fields | overrides))

    def to_dict(self) -> dict[str, Any]:
        record = json.loads(json.dumps(dataclasses.asdict(self)))
        if record["cohorts"] is None:   # as recorded before cohorts could be chosen: same names
            del record["cohorts"]
        if record["crop"] == "tumour":   # as recorded before the crop could be chosen
            del record["crop"], record["crop_size"]
        return record

    def dataset_path(self, data_dir: str) -> str:
        """Where preparation writes a dataset of these settings into `data_dir`:
        DATA_DIR/her2_dce/<config name>/<version>, the path `prepare` prints."""
        return f"{str(data_dir).rstrip('/')}/{DATASET_NAME}/{self.config_name()}/{DATASET_VERSION}"

    def config_name(self) -> str:
        """`<normalization>[_n4][_<cohort>-<cohort>...][_fixed<size>]`, plus a short hash when any
        other setting is not the default."""
        name = self.normalization + ("_n4" if self.n4 else "")
        if self.cohorts:
            name += "_" + "-".join(self.cohorts)
        if self.crop == "fixed":
            side, unit = crop_size_of(self.crop_size)
            name += f"_fixed{side:g}{unit}"
        reference = dataclasses.replace(PrepParams(), normalization=self.normalization, n4=self.n4,
                                        cohorts=self.cohorts, crop=self.crop,
                                        crop_size=self.crop_size)
        if self != reference:
            digest = hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()
            name += "_" + digest[:8]
        return name
