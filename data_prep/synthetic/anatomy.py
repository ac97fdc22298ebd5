"""Anatomy and image formation: grid, breasts, torso, vessels, tumour, bias, noise, artefacts.

:func:`render_patient` turns one patient's :class:`~data_prep.synthetic.planted.PlantedParams`
into a DCE series and a tumour mask (see the package docstring for the model).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage

from data_prep.synthetic.planted import PlantedParams, sigmoid, xy_spacing_mm

UINT16_MAX = 65535.0

ARTEFACT_FACTOR_RANGE = (5.0, 30.0)
CORE_ENHANCEMENT = 0.08
CORE_WASHIN = 0.25
RIM_WIDTH = 0.07

AIR, FAT, FGT, SKIN, MUSCLE, BODY, LUNG, BLOOD, TUMOUR = range(9)
BASE_SIGNAL = np.array([0.0, 1.0, 0.55, 0.60, 0.42, 0.50, 0.05, 0.50, 0.50], dtype=np.float32)
# (A, k_in, k_out) per class; FGT amplitude is the patient's bpe_amplitude, tumour is per voxel.
KINETICS = np.array([
    [0.0, 0.0, 0.0],
    [0.03, 0.003, 0.0],
    [0.0, 0.003, 0.0],
    [0.25, 0.008, 0.0005],
    [0.35, 0.010, 0.0003],
    [0.60, 0.015, 0.0006],
    [0.0, 0.0, 0.0],
    [2.8, 0.060, 0.0012],
    [0.0, 0.0, 0.0],
])


def enhancement(amplitude: ArrayLike, k_in: ArrayLike, k_out: ArrayLike, t: float) -> np.ndarray:
    """Relative enhancement E(t) = A (1 - exp(-k_in t)) exp(-k_out t); rates in 1/s, t in s."""
    return amplitude * (1.0 - np.exp(-k_in * t)) * np.exp(-k_out * t)


@dataclass
class _Grid:
    z: np.ndarray
    y: np.ndarray
    x: np.ndarray
    size: int
    slices: int
    xy_mm: float
    z_mm: float


def _make_grid(size: int, slices: int, xy_mm: float, z_mm: float) -> _Grid:
    return _Grid(
        z=np.arange(slices, dtype=np.float32)[:, None, None],
        y=np.arange(size, dtype=np.float32)[None, :, None],
        x=np.arange(size, dtype=np.float32)[None, None, :],
        size=size,
        slices=slices,
        xy_mm=xy_mm,
        z_mm=z_mm,
    )


def _smooth_field(shape: tuple[int, ...], sigma: Sequence[float],
                  rng: np.random.Generator) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to zero mean and unit variance."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma)
    field -= field.mean()
    field /= max(float(field.std()), 1e-6)
    return field


def _breast_geometry(p: PlantedParams, g: _Grid):
    """Breast normalised radius (min over the two domes), breast mask and chest-wall rows."""
    half = g.size / 2.0
    chest_row = g.size * (p.chest_wall + 0.08 * ((g.x - half) / half) ** 2)
    base_row = g.size * p.chest_wall
    centres = [half - g.size * p.breast_separation, half + g.size * p.breast_separation]
    zc = (g.slices - 1) / 2.0
    az = g.slices * p.breast_height
    rho = None
    for xc in centres:
        r = np.sqrt(((g.x - xc) / (g.size * p.breast_width)) ** 2
                    + ((g.y - base_row) / (g.size * p.breast_depth)) ** 2
                    + ((g.z - zc) / az) ** 2)
        rho = r if rho is None else np.minimum(rho, r)
    breast = (rho < 1.0) & (g.y < chest_row)
    return rho, breast, chest_row, centres


def _tube(g: _Grid, point_mm: np.ndarray, direction: np.ndarray, radius_mm: float) -> np.ndarray:
    """Voxels within ``radius_mm`` of the infinite line through ``point_mm`` along ``direction``."""
    d = direction / np.linalg.norm(direction)
    vz = g.z * g.z_mm - point_mm[0]
    vy = g.y * g.xy_mm - point_mm[1]
    vx = g.x * g.xy_mm - point_mm[2]
    along = vz * d[0] + vy * d[1] + vx * d[2]
    dist2 = vz * vz + vy * vy + vx * vx - along * along
    return dist2 < radius_mm ** 2


def _torso_classes(p: PlantedParams, g: _Grid, chest_row: np.ndarray,
                   classes: np.ndarray) -> np.ndarray:
    """Fill subcutaneous fat, body, muscle, lungs and heart; return the inner body mask."""
    shape = classes.shape
    half = g.size / 2.0
    torso_row = g.size * (p.chest_wall + 0.20)
    torso = (((g.x - half) / (0.47 * g.size)) ** 2
             + ((g.y - torso_row) / (0.25 * g.size)) ** 2) < 1.0
    inner = (((g.x - half) / (0.435 * g.size)) ** 2
             + ((g.y - torso_row) / (0.215 * g.size)) ** 2) < 1.0
    behind_wall = np.broadcast_to(torso & (g.y >= chest_row), shape)
    classes[behind_wall] = FAT
    body = behind_wall & inner
    classes[body] = BODY
    muscle = body & (g.y < chest_row + g.size * p.muscle_depth)
    heart_row = g.size * (p.chest_wall + 0.22)
    heart = body & ~muscle & ((((g.x - half - 0.03 * g.size) / (0.12 * g.size)) ** 2
                               + ((g.y - heart_row) / (0.10 * g.size)) ** 2
                               + ((g.z - (g.slices - 1) / 2.0) / (0.9 * g.slices)) ** 2) < 1.0)
    lungs = np.zeros(shape, dtype=bool)
    for side in (-1.0, 1.0):
        lungs |= (((g.x - half - side * 0.25 * g.size) / (0.15 * g.size)) ** 2
                  + ((g.y - heart_row) / (0.13 * g.size)) ** 2) < 1.0
    lungs &= body & ~muscle & ~heart
    classes[muscle] = MUSCLE
    classes[lungs] = LUNG
    classes[heart] = BLOOD
    return body


def _breast_classes(p: PlantedParams, g: _Grid, rho: np.ndarray, breast: np.ndarray,
                    classes: np.ndarray, rng: np.random.Generator):
    """Fill skin, fat and FGT inside the breasts; return the texture field and the interior."""
    skin = breast & (rho > 0.96)
    interior = breast & ~skin
    texture = _smooth_field(classes.shape, (3.5 / g.z_mm, 3.5 / g.xy_mm, 3.5 / g.xy_mm), rng)
    density = texture + 1.2 * (1.0 - rho)
    threshold = np.quantile(density[interior], 1.0 - p.fgt_fraction) if interior.any() else np.inf
    classes[interior] = FAT
    classes[interior & (density > threshold)] = FGT
    classes[skin] = SKIN
    return texture, interior


def _vessel_classes(p: PlantedParams, g: _Grid, body: np.ndarray, interior: np.ndarray,
                    centres: list[float], classes: np.ndarray, rng: np.random.Generator) -> None:
    """Draw the internal mammary arteries and the oblique breast vessels as BLOOD tubes."""
    half = g.size / 2.0
    row = g.size * (p.chest_wall + 0.015 + p.muscle_depth)
    for side in (-1.0, 1.0):
        point = np.array([0.0, row * g.xy_mm, (half + side * 0.08 * g.size) * g.xy_mm])
        classes[_tube(g, point, np.array([1.0, 0.0, 0.0]), 1.5) & body] = BLOOD
    zc = (g.slices - 1) / 2.0
    for _ in range(p.n_breast_vessels):
        xc = centres[int(rng.integers(0, 2))] + rng.uniform(-0.6, 0.6) * g.size * p.breast_width
        row = g.size * (p.chest_wall - rng.uniform(0.1, 0.6) * p.breast_depth)
        point = np.array([zc * g.z_mm, row * g.xy_mm, xc * g.xy_mm])
        direction = np.array([1.0, rng.normal(0.0, 0.5), rng.normal(0.0, 0.5)])
        radius = max(rng.uniform(1.0, 2.0), 0.6 * g.xy_mm)
        classes[_tube(g, point, direction, radius) & interior] = BLOOD


def _tissue_classes(p: PlantedParams, g: _Grid, rng: np.random.Generator):
    """Class map (Z, Y, X) uint8, fat/FGT texture field, breast interior, breast centre columns."""
    classes = np.zeros((g.slices, g.size, g.size), dtype=np.uint8)
    rho, breast, chest_row, centres = _breast_geometry(p, g)
    body = _torso_classes(p, g, chest_row, classes)
    texture, interior = _breast_classes(p, g, rho, breast, classes, rng)
    _vessel_classes(p, g, body, interior, centres, classes, rng)
    return classes, texture, interior, centres


def _tumour_ellipsoid(p: PlantedParams, g: _Grid, centres: list[float]):
    """Tumour centre (z, y, x) and semi-axes (voxels), clamped to fit the breast and volume."""
    ax_vox = g.size * p.breast_width
    ay_vox = g.size * p.breast_depth
    az_vox = g.slices * p.breast_height
    oz, oy, ox = p.tumour_offset
    radius_mm = 0.5 * p.tumour_diameter_mm * np.asarray(p.tumour_axis_ratios)
    reach_factor = 1.0 + 1.5 * p.irregularity
    rz = float(np.clip(radius_mm[0] / g.z_mm, 2.0, 0.3 * g.slices / reach_factor))
    ry = float(np.clip(radius_mm[1] / g.xy_mm, 1.2, 0.40 * ay_vox))
    rx = float(np.clip(radius_mm[2] / g.xy_mm, 1.2, 0.40 * ax_vox))
    z_margin = rz * reach_factor + 1.0
    cz = float(np.clip((g.slices - 1) / 2.0 + oz * az_vox, z_margin, g.slices - 1 - z_margin))
    cy = g.size * p.chest_wall - (0.45 + 0.5 * oy) * ay_vox
    cx = centres[p.tumour_side] + ox * ax_vox
    return (cz, cy, cx), (rz, ry, rx)


def _largest_component(region: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(region)
    if count <= 1:
        return region
    sizes = ndimage.sum_labels(region, labels, index=np.arange(1, count + 1))
    return labels == 1 + int(np.argmax(sizes))


def _tumour(p: PlantedParams, g: _Grid, interior: np.ndarray, centres: list[float],
            rng: np.random.Generator):
    """Tumour mask (Z, Y, X) bool, its crop box, and crop-sized mask, rim weight and texture."""
    (cz, cy, cx), (rz, ry, rx) = _tumour_ellipsoid(p, g, centres)
    reach = 1.5 * max(ry, rx) + 2
    lo = np.maximum(np.floor([cz - 1.5 * rz - 2, cy - reach, cx - reach]).astype(int), 0)
    hi = np.minimum(np.ceil([cz + 1.5 * rz + 3, cy + reach + 1, cx + reach + 1]).astype(int),
                    interior.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    zz, yy, xx = np.meshgrid(*(np.arange(a, b, dtype=np.float32) for a, b in zip(lo, hi)),
                             indexing="ij")
    cos, sin = math.cos(p.tumour_angle_rad), math.sin(p.tumour_angle_rad)
    u = (xx - cx) * cos + (yy - cy) * sin
    v = -(xx - cx) * sin + (yy - cy) * cos
    rho = np.sqrt((u / rx) ** 2 + (v / ry) ** 2 + ((zz - cz) / rz) ** 2)
    bump = _smooth_field(rho.shape, (0.5 * rz, 0.5 * ry, 0.5 * rx), rng)
    rho_eff = rho / (1.0 + p.irregularity * np.clip(bump, -0.8, 1.5))
    crop = _largest_component((rho_eff < 1.0) & interior[box])
    if not crop.any():
        centre = np.clip(np.round([cz, cy, cx]).astype(int) - lo, 0, np.array(rho.shape) - 1)
        crop[tuple(centre)] = True
    rim = sigmoid((rho_eff - p.necrotic_fraction) / RIM_WIDTH).astype(np.float32)
    texture = _smooth_field(rho.shape, (0.7, 1.0, 1.0), rng)
    mask = np.zeros(interior.shape, dtype=bool)
    mask[box] = crop
    return mask, box, crop, rim, texture


def _bias_field(p: PlantedParams, g: _Grid) -> np.ndarray:
    """B = exp(p(x, y, z)), quadratic p rescaled so max |p| = log(1 + bias_amplitude)."""
    zn = 2.0 * g.z / max(g.slices - 1, 1) - 1.0
    yn = 2.0 * g.y / (g.size - 1) - 1.0
    xn = 2.0 * g.x / (g.size - 1) - 1.0
    terms = (xn, yn, zn, xn * xn, yn * yn, zn * zn, xn * yn, xn * zn, yn * zn)
    poly = sum(c * t for c, t in zip(p.bias_coefficients, terms))
    poly = np.broadcast_to(poly, (g.slices, g.size, g.size)).astype(np.float32)
    poly *= math.log1p(p.bias_amplitude) / max(float(np.abs(poly).max()), 1e-6)
    return np.exp(poly)


def _rician(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude image |signal + sigma (n1 + i n2)|, n1, n2 ~ N(0, 1)."""
    sigma = np.float32(sigma)
    real = signal + sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    return np.hypot(real, imag)


def _add_artefacts(volume: np.ndarray, tissue_index: np.ndarray, p: PlantedParams,
                   rng: np.random.Generator) -> None:
    """Raise ``n_artefacts`` random tissue voxels to f * L, f ~ U(5, 30), in place."""
    spikes = rng.choice(tissue_index, size=p.n_artefacts, replace=False)
    factors = rng.uniform(*ARTEFACT_FACTOR_RANGE, size=p.n_artefacts)
    flat = volume.reshape(-1)
    flat[spikes] = np.maximum(flat[spikes], factors * p.tissue_level)


def render_patient(params: PlantedParams, size: int, slices: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Render the DCE series and tumour mask of one patient.

    Returns:
        phases: (T, Z, Y, X) float32, integer-valued, in [0, 65535].
        mask: (Z, Y, X) int32 in {0, 1}.
    """
    g = _make_grid(size, slices, xy_spacing_mm(params, size), params.slice_thick_mm)
    classes, texture, interior, centres = _tissue_classes(params, g, rng)
    mask, box, crop, rim, tumour_texture = _tumour(params, g, interior, centres, rng)
    classes[mask] = TUMOUR

    base = BASE_SIGNAL[classes]
    fatty = classes == FAT
    base[fatty] *= 1.0 + 0.05 * texture[fatty]
    kinetics = KINETICS.copy()
    kinetics[FGT, 0] = params.bpe_amplitude
    amplitude = params.peak_enhancement * (1.0 + params.texture_amplitude * tumour_texture)
    amplitude *= CORE_ENHANCEMENT + (1.0 - CORE_ENHANCEMENT) * rim
    k_in = params.washin_rate * (CORE_WASHIN + (1.0 - CORE_WASHIN) * rim)

    scaled_bias = _bias_field(params, g) * np.float32(params.tissue_level)
    tissue_index = np.flatnonzero(classes != AIR)
    phases = np.empty((len(params.times_s),) + classes.shape, dtype=np.float32)
    for t_index, t in enumerate(params.times_s):
        curve = enhancement(kinetics[:, 0], kinetics[:, 1], kinetics[:, 2], t).astype(np.float32)
        relative = base * (1.0 + curve[classes])
        tumour_curve = enhancement(amplitude, k_in, params.washout_rate, t)
        relative[box][crop] = base[box][crop] * (1.0 + tumour_curve[crop])
        relative = ndimage.gaussian_filter(relative, (0.35, 0.6, 0.6))
        volume = _rician(relative * scaled_bias, params.noise_sigma, rng)
        _add_artefacts(volume, tissue_index, params, rng)
        np.clip(np.rint(volume, out=volume), 0.0, UINT16_MAX, out=volume)
        phases[t_index] = volume
    return phases, mask.astype(np.int32)
