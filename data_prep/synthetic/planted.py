"""Planted per-patient parameters: sites, HER2 effect sizes, sampling, oracle, clinical columns.

Everything here is cheap (no image is rendered); see the package docstring of
:mod:`data_prep.synthetic` for the generative model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from her2jax.errors import InvalidSetting

REFERENCE_MATRIX = 384

EFFECT_SIZES: dict[str, float] = {"washin": 1.2, "washout": 1.2, "necrosis": 1.0}
WASHIN_REF_PER_S = 0.010
WASHIN_LOG_SD = 0.45
WASHOUT_MEAN_PER_S = 0.0005
WASHOUT_SD_PER_S = 0.0005
NECROSIS_MAX = 0.75
NECROSIS_SLOPE = 1.5
NECROSIS_OFFSET = -0.5
COMBINED_EFFECT = math.sqrt(sum(d * d for d in EFFECT_SIZES.values()))
ORACLE_AUC = 0.5 * (1.0 + math.erf(COMBINED_EFFECT / 2.0))
"""AUC of :func:`oracle_score`: Phi(Delta / sqrt 2) = (1 + erf(Delta / 2)) / 2."""


@dataclass(frozen=True)
class SiteProfile:
    """Scanner and protocol of one synthetic site.

    Attributes:
        name: value of the ``dataset`` column.
        letter: site letter used in the pid.
        naming: ``"spy1"`` (I-SPY1 file names) or ``"spy2"`` (I-SPY2 file names).
        tissue_level: fat signal before contrast, scanner units (L before the patient gain).
        noise_fraction: Rician noise sigma as a fraction of the tissue level.
        times_s: acquisition times of the DCE phases, seconds after injection.
        post_early: index of the early post-contrast phase.
        native_spacing_mm: range of the in-plane spacing at a 384-pixel matrix.
        slice_thick_mm: range of the slice thickness.
        bias_amplitude: range of the bias field amplitude a (max |log B| = log(1 + a)).
    """

    name: str
    letter: str
    naming: str
    tissue_level: float
    noise_fraction: float
    times_s: tuple[float, ...]
    post_early: int
    native_spacing_mm: tuple[float, float]
    slice_thick_mm: tuple[float, float]
    bias_amplitude: tuple[float, float]


SITES: dict[str, SiteProfile] = {
    "synthetic_a": SiteProfile(
        "synthetic_a", "A", "spy1", 400.0, 0.020, (0.0, 150.0, 300.0, 450.0), 1,
        (0.78, 0.90), (2.8, 3.0), (0.20, 0.30),
    ),
    "synthetic_b": SiteProfile(
        "synthetic_b", "B", "spy2", 1200.0, 0.012, (0.0, 75.0, 150.0, 300.0, 450.0, 600.0), 2,
        (0.60, 0.72), (2.0, 2.2), (0.25, 0.35),
    ),
    "synthetic_c": SiteProfile(
        "synthetic_c", "C", "spy2", 140.0, 0.035, (0.0, 80.0, 160.0, 320.0, 480.0), 2,
        (0.68, 0.80), (2.4, 2.6), (0.30, 0.40),
    ),
}


@dataclass(frozen=True)
class PlantedParams:
    """Every per-patient parameter of the generative model (see the :mod:`data_prep.synthetic` docstring).

    Attributes:
        her2, site: label (0/1) and site name.
        gain: patient scanner gain, exp(N(0, 0.1)).
        tissue_level: L = site level * gain, fat signal before contrast (scanner units).
        noise_sigma: Rician sigma (scanner units), site fraction of L times exp(N(0, 0.1)).
        native_spacing_mm: in-plane spacing at a 384 matrix (xy_spacing = it * 384 / size).
        slice_thick_mm: slice thickness (mm).
        bias_amplitude, bias_coefficients: a and the 9 polynomial coefficients of log B.
        chest_wall: chest-wall row at the midline, fraction of the matrix size.
        breast_separation: breast centre offset from the midline, fraction of the size.
        breast_width, breast_depth: dome semi-axes across / anterior, fractions of the size.
        breast_height: dome semi-axis along z, fraction of the slice count.
        muscle_depth: pectoral band thickness, fraction of the size.
        fgt_fraction: fraction of the breast interior that is FGT (breast density).
        bpe_amplitude: FGT enhancement amplitude A (background parenchymal enhancement).
        n_breast_vessels: oblique breast vessels; n_artefacts: hot voxels per volume.
        tumour_side: 0 for the breast at low x, 1 for the other.
        tumour_offset: tumour centre in dome units (z, anterior-posterior, x).
        tumour_diameter_mm, tumour_axis_ratios, tumour_angle_rad: size, shape, in-plane angle.
        irregularity: surface perturbation, fraction of the radius.
        texture_amplitude: relative spread of the tumour enhancement amplitude.
        peak_enhancement: tumour enhancement amplitude A.
        washin_z, washout_z, necrosis_z: latent HER2-dependent scores.
        washin_rate, washout_rate: tumour k_in, k_out (1/s).
        necrotic_fraction: necrotic core radius / tumour radius.

    Drawn while rendering, from the same patient stream: texture fields, vessel positions,
    directions and radii, the tumour surface field, noise, artefact positions and factors.
    """

    her2: int
    site: str
    gain: float
    tissue_level: float
    noise_sigma: float
    native_spacing_mm: float
    slice_thick_mm: float
    bias_amplitude: float
    bias_coefficients: tuple[float, ...]
    chest_wall: float
    breast_separation: float
    breast_width: float
    breast_depth: float
    breast_height: float
    muscle_depth: float
    fgt_fraction: float
    bpe_amplitude: float
    n_breast_vessels: int
    n_artefacts: int
    tumour_side: int
    tumour_offset: tuple[float, float, float]
    tumour_diameter_mm: float
    tumour_axis_ratios: tuple[float, float, float]
    tumour_angle_rad: float
    irregularity: float
    texture_amplitude: float
    peak_enhancement: float
    washin_z: float
    washout_z: float
    necrosis_z: float
    washin_rate: float
    washout_rate: float
    necrotic_fraction: float

    @property
    def times_s(self) -> tuple[float, ...]:
        """Acquisition times of the DCE phases, seconds after injection."""
        return SITES[self.site].times_s


def sigmoid(x: float | np.ndarray) -> float | np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def washin_rate_from_latent(z: float) -> float:
    """k_in = 0.010 * exp(0.45 z), in 1/s."""
    return WASHIN_REF_PER_S * math.exp(WASHIN_LOG_SD * z)


def washout_rate_from_latent(z: float) -> float:
    """k_out = 0.0005 + 0.0005 z, in 1/s (negative: persistent enhancement)."""
    return WASHOUT_MEAN_PER_S + WASHOUT_SD_PER_S * z


def necrotic_fraction_from_latent(z: float) -> float:
    """Necrotic core radius as a fraction of the tumour radius: 0.75 sigmoid(1.5 z - 0.5)."""
    return NECROSIS_MAX * float(sigmoid(NECROSIS_SLOPE * z + NECROSIS_OFFSET))


def oracle_score(params: PlantedParams) -> float:
    """Bayes-optimal HER2 score from the planted kinetics: sum_j d_j z_j.

    The latent scores are recovered by inverting the maps from the physical parameters
    (washin_rate, washout_rate, necrotic_fraction); the other parameters do not depend on HER2.
    """
    z_in = math.log(params.washin_rate / WASHIN_REF_PER_S) / WASHIN_LOG_SD
    z_out = (params.washout_rate - WASHOUT_MEAN_PER_S) / WASHOUT_SD_PER_S
    p = params.necrotic_fraction / NECROSIS_MAX
    z_nec = (math.log(p / (1.0 - p)) - NECROSIS_OFFSET) / NECROSIS_SLOPE
    return (
        EFFECT_SIZES["washin"] * z_in
        + EFFECT_SIZES["washout"] * z_out
        + EFFECT_SIZES["necrosis"] * z_nec
    )


def _latent(her2: int, effect: float, rng: np.random.Generator) -> float:
    mean = effect / 2.0 if her2 else -effect / 2.0
    return float(rng.normal(mean, 1.0))


def sample_planted_params(her2: int, site: str, rng: np.random.Generator) -> PlantedParams:
    """Draw one patient's planted parameters for a HER2 label (0/1) and a site name.

    Only ``washin_z``, ``washout_z`` and ``necrosis_z`` (and the rates derived from them) depend
    on the label; the site sets the tissue level, noise, spacing, times and bias range. Cheap
    (no image is rendered), so thousands of draws can check the planted effect.
    """
    if her2 not in (0, 1):
        raise InvalidSetting(f"her2 must be 0 or 1, got {her2!r}")
    if site not in SITES:
        raise InvalidSetting(f"unknown site {site!r}; expected one of {sorted(SITES)}")
    profile = SITES[site]
    gain = float(np.exp(rng.normal(0.0, 0.1)))
    tissue_level = profile.tissue_level * gain
    washin_z = _latent(her2, EFFECT_SIZES["washin"], rng)
    washout_z = _latent(her2, EFFECT_SIZES["washout"], rng)
    necrosis_z = _latent(her2, EFFECT_SIZES["necrosis"], rng)
    ratios = np.exp(rng.normal(0.0, 0.2, size=3))
    ratios /= np.cbrt(np.prod(ratios))
    offset_radius = rng.uniform(0.0, 0.55)
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    return PlantedParams(
        her2=int(her2),
        site=site,
        gain=gain,
        tissue_level=tissue_level,
        noise_sigma=tissue_level * profile.noise_fraction * float(np.exp(rng.normal(0.0, 0.1))),
        native_spacing_mm=float(rng.uniform(*profile.native_spacing_mm)),
        slice_thick_mm=round(float(rng.uniform(*profile.slice_thick_mm)), 1),
        bias_amplitude=float(rng.uniform(*profile.bias_amplitude)),
        bias_coefficients=tuple(float(c) for c in rng.normal(size=9)),
        chest_wall=float(rng.uniform(0.50, 0.56)),
        breast_separation=float(rng.uniform(0.22, 0.25)),
        breast_width=float(rng.uniform(0.17, 0.21)),
        breast_depth=float(rng.uniform(0.26, 0.34)),
        breast_height=float(rng.uniform(0.60, 0.75)),
        muscle_depth=float(rng.uniform(0.03, 0.045)),
        fgt_fraction=float(rng.uniform(0.10, 0.50)),
        bpe_amplitude=float(rng.uniform(0.05, 0.35)),
        n_breast_vessels=int(rng.integers(2, 6)),
        n_artefacts=int(rng.integers(3, 9)),
        tumour_side=int(rng.integers(0, 2)),
        tumour_offset=tuple(float(v) for v in direction * offset_radius),
        tumour_diameter_mm=float(np.clip(18.0 * np.exp(rng.normal(0.0, 0.4)), 6.0, 45.0)),
        tumour_axis_ratios=tuple(float(r) for r in ratios),
        tumour_angle_rad=float(rng.uniform(0.0, math.pi)),
        irregularity=float(rng.uniform(0.10, 0.30)),
        texture_amplitude=float(rng.uniform(0.10, 0.25)),
        peak_enhancement=float(1.3 * np.exp(rng.normal(0.0, 0.25))),
        washin_z=washin_z,
        washout_z=washout_z,
        necrosis_z=necrosis_z,
        washin_rate=washin_rate_from_latent(washin_z),
        washout_rate=washout_rate_from_latent(washout_z),
        necrotic_fraction=necrotic_fraction_from_latent(necrosis_z),
    )


def xy_spacing_mm(params: PlantedParams, size: int) -> float:
    """In-plane spacing (mm) at matrix ``size``: native spacing * 384 / size."""
    return params.native_spacing_mm * REFERENCE_MATRIX / size


def sample_clinical(her2: int, rng: np.random.Generator) -> dict[str, object]:
    """Clinical columns: HR, pCR, age, menopause, race and the HER2 leakage columns."""
    hr = int(rng.random() < 0.6)
    pcr = int(rng.random() < 0.3)
    age = int(np.clip(round(rng.normal(50.0, 10.0)), 25, 75))
    menopause = int(rng.random() < float(sigmoid((age - 50.0) / 3.0)))
    race = rng.choice(3, p=[0.72, 0.15, 0.13])
    return {
        "pCR": pcr,
        "age": age,
        "menopause": menopause,
        "race_white": int(race == 0),
        "race_black": int(race == 1),
        "HR": hr,
        "HER2": int(her2),
        **leakage_columns(her2, hr),
    }


def leakage_columns(her2: int, hr: int) -> dict[str, object]:
    """HR_HER2_STATUS, TripleNeg, HER2pos, HRposHER2neg as the real data encodes them."""
    status = "HER2+" if her2 else ("HR+HER2-" if hr else "TN")
    return {
        "HR_HER2_STATUS": status,
        "TripleNeg": int(not her2 and not hr),
        "HER2pos": int(bool(her2)),
        "HRposHER2neg": int(bool(hr) and not her2),
    }
