"""N4 bias-field correction (Tustison et al., 2010) with SimpleITK.

The field is estimated ONCE per patient, on the pre-contrast phase, and the same field divides all
three phases. The bias field is the receive-coil sensitivity, identical for every time point of one
DCE acquisition; estimating it per phase would let N4 absorb part of the contrast enhancement
(bright, spatially smooth in the tumour and vessels) into the "bias" and so change the
pre/early/late ratios that carry the kinetics. The pre-contrast phase has no enhancement to confuse.

Speed-up: the field is fitted on the volume shrunk by `shrink` in-plane (slices are few and thick,
so z is not shrunk), inside an Otsu foreground mask, then evaluated at full resolution:

    corrected_c(v) = phase_c(v) / exp(log_field(v))
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk


def estimate_log_field(volume: np.ndarray, spacing: tuple[float, float, float],
                       shrink: int = 4, iterations: tuple[int, ...] = (50, 50, 50, 50),
                       convergence: float = 0.001, histogram_bins: int = 200) -> np.ndarray:
    """The log bias field of a (z, y, x) volume, at full resolution, as float32 (z, y, x).

    spacing is (z, y, x) in mm: the B-spline control grid of N4 lives in physical space, so thick
    slices must be known to keep the field smooth in the right proportions.
    """
    image = sitk.GetImageFromArray(np.asarray(volume, dtype=np.float32))
    image.SetSpacing(tuple(float(s) for s in reversed(spacing)))
    foreground = sitk.OtsuThreshold(image, 0, 1, histogram_bins)
    factors = [shrink, shrink, 1]
    small_image = sitk.Shrink(image, factors)
    small_mask = sitk.Shrink(foreground, factors)
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([int(i) for i in iterations])
    corrector.SetConvergenceThreshold(convergence)
    corrector.SetNumberOfHistogramBins(histogram_bins)
    corrector.Execute(small_image, small_mask)
    log_field = corrector.GetLogBiasFieldAsImage(image)
    return sitk.GetArrayFromImage(log_field).astype(np.float32)


def correct_phases(phases: np.ndarray, spacing: tuple[float, float, float], shrink: int = 4,
                   iterations: tuple[int, ...] = (50, 50, 50, 50)) -> np.ndarray:
    """Divides every phase of (3, z, y, x) by the field estimated on the pre-contrast phase."""
    log_field = estimate_log_field(phases[0], spacing, shrink, iterations)
    return (phases / np.exp(log_field)[None]).astype(np.float32)
