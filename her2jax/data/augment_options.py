"""Training augmentation's options, without JAX or TensorFlow (the run configs import them):
`DEFAULT_AUGMENT` is what a training run uses unless its config says otherwise, `Augment` the
checked form both implementations (`augment_host` in tf.data, `augment` on the device) read.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from her2jax.errors import InvalidSetting

DEFAULT_CROP_RATIO = (3 / 4, 4 / 3)
# training only (evaluation never augments): a random resized crop of area fraction in `scale` and
# aspect ratio in `ratio`, a horizontal flip with probability `flip`, a rotation drawn from
# U(-d, d) degrees, contrast and brightness jitter j (one pair per image)
DEFAULT_AUGMENT = {"random_resized_crop": {"scale": (0.7, 1.0), "ratio": DEFAULT_CROP_RATIO},
                   "flip": 0.5, "rotate_degrees": 10.0, "intensity_jitter": 0.1}
CROP_ATTEMPTS = 10
AUGMENT_ON = ("host", "device")


@dataclasses.dataclass(frozen=True)
class Augment:
    """Which steps run and how strongly; the default runs none (evaluation)."""
    crop_scale: tuple[float, float] | None = None
    crop_ratio: tuple[float, float] = DEFAULT_CROP_RATIO
    flip: float = 0.0
    rotate_degrees: float = 0.0
    intensity_jitter: float = 0.0

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None) -> Augment:
        """From {"random_resized_crop": {"scale": (lo, hi), "ratio": (lo, hi)} or None, "flip": p,
        "rotate_degrees": d, "intensity_jitter": j}; missing keys are off."""
        options = dict(options or {})
        unknown = set(options) - set(DEFAULT_AUGMENT)
        if unknown:
            raise InvalidSetting(f"unknown augmentation option(s) {sorted(unknown)}; "
                                 f"known: {sorted(DEFAULT_AUGMENT)}")
        crop = options.get("random_resized_crop")
        crop = dict(crop) if crop else {}
        if set(crop) - {"scale", "ratio"}:
            raise InvalidSetting(f"random_resized_crop takes scale and ratio, got {sorted(crop)}")
        augment = cls(
            crop_scale=_pair(crop["scale"]) if crop else None,
            crop_ratio=_pair(crop.get("ratio", DEFAULT_CROP_RATIO)),
            flip=float(options.get("flip") or 0.0),
            rotate_degrees=float(options.get("rotate_degrees") or 0.0),
            intensity_jitter=float(options.get("intensity_jitter") or 0.0))
        augment.check()
        return augment

    def check(self) -> None:
        """Raises ValueError on an option outside its range."""
        if self.crop_scale and not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise InvalidSetting(f"crop scale {self.crop_scale}: need 0 < low <= high <= 1")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise InvalidSetting(f"crop ratio {self.crop_ratio}: need 0 < low <= high")
        if not 0 <= self.flip <= 1:
            raise InvalidSetting(f"flip {self.flip} is a probability")
        if not 0 <= self.rotate_degrees <= 180:
            raise InvalidSetting(f"rotate_degrees {self.rotate_degrees}: need 0..180")
        if not 0 <= self.intensity_jitter < 1:
            raise InvalidSetting(f"intensity_jitter {self.intensity_jitter}: need 0 <= j < 1")

    def magnitudes(self) -> dict[str, float]:
        """The scalar magnitudes of the steps that are on, as a packed train step takes them
        (`augment.augment_batch(magnitudes=...)`): flip probability, rotation limit in radians,
        intensity jitter."""
        values = {"flip": self.flip, "rotate_radians": math.radians(self.rotate_degrees),
                  "intensity_jitter": self.intensity_jitter}
        return {key: value for key, value in values.items() if value}

    @property
    def active(self) -> bool:
        return bool(self.crop_scale or self.flip or self.rotate_degrees or self.intensity_jitter)


def _pair(values: Any) -> tuple[float, float]:
    low, high = (float(v) for v in values)
    return low, high


def check_augment_on(value: str) -> None:
    """Raises ValueError unless `value` is one of AUGMENT_ON."""
    if value not in AUGMENT_ON:
        raise InvalidSetting(f"input.augment_on {value!r}: one of {AUGMENT_ON}")
