"""Synthetic DCE-MRI breast cohort in the BreastDCEDL on-disk layout.

No real data can be downloaded, so this cohort is the project's default dataset. It reproduces
what matters for preparation and for HER2 prediction: scanner intensities in the uint16 range,
site-dependent scales and noise, smooth coil bias fields, a few hot artefact voxels that break
min-max scaling, contrast kinetics per tissue, one tumour per patient whose kinetics depend on
HER2 with a moderate planted effect, and the storage trap of the real data.

Usage::

    python -m data_prep.synthetic --out DIR [--patients 40] [--seed 0] [--size 128] [--slices 32]

On-disk layout (identical to BreastDCEDL)
-----------------------------------------
``DIR/metadata.csv``
    One row per patient, the 29 columns of :data:`METADATA_COLUMNS` in that order. ``dataset``
    is the site (``synthetic_a``, ``synthetic_b``, ``synthetic_c``), ``test`` the patient-level
    split (0 train, 1 test, 2 validation; about 70/15/15, stratified by HER2). ``slice_thick``
    and ``xy_spacing`` (mm) are the only record of the voxel spacing. ``mask_start``/``mask_end``
    are the first/last tumour slice (z), ``sraw``/``eraw`` the first/last row (y) and
    ``scol``/``ecol`` the first/last column (x) of the mask, all inclusive; ``tum_vol`` is the
    number of tumour voxels. ``HR_HER2_STATUS``, ``HER2pos``, ``HRposHER2neg`` and ``TripleNeg``
    encode HER2 exactly as in the real data (leakage columns: never model inputs).
``DIR/dce/``, ``DIR/mask/``
    One file per DCE time point t = 0 .. n_times-1 and one tumour mask per patient:
    site ``synthetic_a`` uses I-SPY1 names ``<pid>_spy1_vis1_acq<t>.nii.gz`` and
    ``<pid>_spy1_vis1_mask.nii.gz``; sites ``synthetic_b``/``synthetic_c`` use I-SPY2 names
    ``<pid>_spy2_vis1_dce_aqc_<t>.nii.gz`` and ``<pid>_spy2_vis1_mask.nii.gz``.
    The trap: arrays are (z, y, x) saved with an identity affine (1 mm spacing in the header),
    so nibabel's ``get_fdata()`` returns (z, y, x) while SimpleITK's ``GetArrayFromImage``
    returns (x, y, z), slice axis last. DCE volumes are float32 holding integers in
    [0, 65535]; masks are int32 in {0, 1}. Files are gzip level 1 with mtime 0, so a seed
    reproduces them byte for byte.
``DIR/ground_truth.csv``
    pid, HER2, site and every planted per-patient parameter of :class:`PlantedParams`, plus the
    oracle score. Preparation code never reads it.

Geometry
--------
Axial slices, y = 0 anterior. Two breast domes (half-ellipsoids, semi-axes ``breast_width``
and ``breast_depth`` times the matrix size in-plane, ``breast_height`` times the slice count in
z) stand in front of a chest wall at row ``chest_wall`` x size (curving back laterally); behind
it a torso ellipse holds a ring of subcutaneous fat, a pectoral muscle band, two lungs (dark),
the heart (blood pool) and other body tissue. Inside each breast: a skin shell (outer 4% of the
dome radius), fat, and fibroglandular tissue (FGT) where ``g + 1.2 (1 - rho)`` exceeds its
``(1 - fgt_fraction)`` quantile (g: Gaussian random field smoothed with sigma 3.5 mm, unit
variance; rho: normalised dome radius, so FGT gathers centrally). Vessels are tubes: two
internal mammary arteries (radius 1.5 mm) behind the chest wall and ``n_breast_vessels``
oblique breast vessels (radius 1-2 mm). The anatomy is
drawn in fractions of the field of view (the operator fits the field of view to the patient);
the tumour is drawn in millimetres.

Spacing: each site has a native in-plane spacing s in [0.6, 0.9] mm at a 384-pixel matrix, and
``xy_spacing = s * 384 / size``, so every matrix size images the same 230-350 mm field of view
holding both breasts (1.8-2.7 mm at size 128).

Signal model
------------
For voxel v of tissue class c at time t (seconds after injection), the relative signal is::

    r(v, t) = b0(c) * texture(v) * (1 + E_c(t)),   E(t) = A * (1 - exp(-k_in t)) * exp(-k_out t)

(an empirical wash-in/wash-out curve: amplitude A, wash-in rate k_in, wash-out rate k_out in
1/s; k_out < 0 is persistent enhancement). ``r`` is blurred (Gaussian, sigma 0.6 px in-plane,
0.35 slice, partial volume), multiplied by the patient's tissue level L (fat, pre-contrast) and
the bias field B(v), and stored as the Rician magnitude::

    S(v, t) = | L * B(v) * r(v, t) + sigma * (n1 + i n2) |,   n1, n2 ~ N(0, 1)

Then ``n_artefacts`` random tissue voxels per volume are set to ``f * L`` with f ~ U(5, 30)
(spikes; not modulated by B), and S is rounded and clipped to [0, 65535].

==========  ======  ======================  =================================================
class       b0      A / k_in / k_out (1/s)  stands for
==========  ======  ======================  =================================================
air         0       -                       background: pure Rician noise
fat         1.00    0.03 / 0.003 / 0        fatty breast tissue (texture +-5%)
FGT         0.55    bpe / 0.003 / 0         background parenchymal enhancement: mild, slow
skin        0.60    0.25 / 0.008 / 0.0005   skin shell of the breasts
muscle      0.42    0.35 / 0.010 / 0.0003   pectoral muscle band
body        0.50    0.60 / 0.015 / 0.0006   other thoracic tissue
lung        0.05    0                       lungs
blood       0.50    2.8 / 0.060 / 0.0012    heart and vessels: fast and strong
tumour      0.50    per voxel (below)       the lesion
==========  ======  ======================  =================================================

Bias field: ``B = exp(p)`` with p a random quadratic polynomial in the normalised coordinates
(x, y, z in [-1, 1]; 9 monomials, coefficients N(0, 1)), rescaled so max |p| = log(1 + a), a
drawn per patient from the site's range, i.e. a smooth +-20-40% multiplicative field shared by
all time points of a patient.

Sites
-----
=============  ======  ======  ===========  =========  ============  ==============  ==========
site           naming  L (au)  sigma / L    n_times    times (s)     s (mm @384)     slice (mm)
=============  ======  ======  ===========  =========  ============  ==============  ==========
synthetic_a    spy1    400     0.020        4 (e=1)    0-150-300-    0.78-0.90       2.8-3.0
                                                       450
synthetic_b    spy2    1200    0.012        6 (e=2)    0-75-150-     0.60-0.72       2.0-2.2
                                                       300-450-600
synthetic_c    spy2    140     0.035        5 (e=2)    0-80-160-     0.68-0.80       2.4-2.6
                                                       320-480
=============  ======  ======  ===========  =========  ============  ==============  ==========

L is multiplied per patient by a gain exp(N(0, 0.1)); bias amplitude a ~ U(0.20, 0.30) at a,
U(0.25, 0.35) at b, U(0.30, 0.40) at c. ``pre`` = 0, ``post_early`` = e, ``post_late`` =
n_times - 1.

Tumour
------
One irregular ellipsoid per patient inside one breast: equivalent diameter lognormal (median
18 mm, log-sd 0.4, clipped to 6-45 mm), axis ratios exp(N(0, 0.2)), random in-plane rotation,
surface perturbed by a smoothed random field (``irregularity`` 0.1-0.3 of the radius: the
boundary radius is 1 + irregularity * clip(g', -0.8, 1.5) times the ellipsoid's), a z semi-axis of
at least 2 slices (so it spans 3 or more), clipped to the breast, largest connected component
kept. Per voxel, with rho the normalised radius::

    rim   = sigmoid((rho - necrotic_fraction) / 0.07)
    A_v   = peak_enhancement * (1 + texture_amplitude * g(v)) * (0.08 + 0.92 * rim)
    k_in_v = washin_rate * (0.25 + 0.75 * rim)

so a necrotic core enhances little and late (rim enhancement). ``g`` is a smoothed unit-variance
field; ``peak_enhancement`` ~ lognormal(median 1.3, log-sd 0.25) and ``texture_amplitude`` ~
U(0.10, 0.25) do not depend on HER2.

Planted HER2 effect: three latent scores z_j ~ N(+d_j/2, 1) for HER2-positive, N(-d_j/2, 1)
for HER2-negative, independent, mapped monotonically to kinetics:

===========  ====  =============================================  ===========================
latent       d_j   parameter                                      meaning
===========  ====  =============================================  ===========================
washin_z     1.2   washin_rate = 0.010 exp(0.45 z) (1/s)          HER2+ wash in faster
washout_z    1.2   washout_rate = 0.0005 + 0.0005 z (1/s)         HER2+ wash out more
necrosis_z   1.0   necrotic_fraction = 0.75 sigmoid(1.5 z - 0.5)  HER2+ larger necrotic core
===========  ====  =============================================  ===========================

The Bayes-optimal classifier given the planted parameters is the log-likelihood ratio
``sum_j d_j z_j`` (:func:`oracle_score`, which inverts the maps), with combined effect size
Delta = sqrt(1.2^2 + 1.2^2 + 1.0^2) = 1.97 and oracle AUC = Phi(Delta / sqrt 2) = 0.918
(:data:`ORACLE_AUC`); it is not 1 because the label distributions overlap. Images add noise,
bias, partial volume and tumour texture on top; a single hand-made image feature, the ratio of
the mask-mean early and late signals, reaches about 0.87.

Cohort
------
Exactly ``round(0.25 N)`` HER2-positive patients, labels and sites (balanced round-robin)
shuffled by the seed; HR ~ Bernoulli(0.6), pCR ~ Bernoulli(0.3), age ~ N(50, 10) clipped to
25-75, menopause ~ Bernoulli(sigmoid((age - 50) / 3)), race white/black/other 0.72/0.15/0.13.
Patient i draws everything from ``SeedSequence(seed, spawn_key=(1, i))``, the same stream as
``SeedSequence(seed).spawn(2)[1].spawn(i + 1)[i]``; the cohort plan (labels, sites, splits)
draws from ``spawn_key=(0,)``. :func:`generate_patient` is a pure function of (seed, index,
label, site, size, slices), so the same seed and cohort size give byte-identical files.
"""

from __future__ import annotations

from data_prep.synthetic.anatomy import (
    AIR,
    ARTEFACT_FACTOR_RANGE,
    BASE_SIGNAL,
    BLOOD,
    BODY,
    CORE_ENHANCEMENT,
    CORE_WASHIN,
    FAT,
    FGT,
    KINETICS,
    LUNG,
    MUSCLE,
    RIM_WIDTH,
    SKIN,
    TUMOUR,
    UINT16_MAX,
    enhancement,
    render_patient,
)
from data_prep.synthetic.cohort import (
    METADATA_COLUMNS,
    MIN_SIZE,
    MIN_SLICES,
    PREVALENCE,
    SPLIT_TEST,
    SPLIT_TRAIN,
    SPLIT_VALIDATION,
    PatientPlan,
    SyntheticPatient,
    generate_cohort,
    generate_patient,
    image_paths,
    mask_extent,
    patient_rng,
    pid_for,
    plan_cohort,
    save_nifti,
)
from data_prep.synthetic.planted import (
    COMBINED_EFFECT,
    EFFECT_SIZES,
    NECROSIS_MAX,
    NECROSIS_OFFSET,
    NECROSIS_SLOPE,
    ORACLE_AUC,
    REFERENCE_MATRIX,
    SITES,
    WASHIN_LOG_SD,
    WASHIN_REF_PER_S,
    WASHOUT_MEAN_PER_S,
    WASHOUT_SD_PER_S,
    PlantedParams,
    SiteProfile,
    leakage_columns,
    necrotic_fraction_from_latent,
    oracle_score,
    sample_clinical,
    sample_planted_params,
    washin_rate_from_latent,
    washout_rate_from_latent,
    xy_spacing_mm,
)

__all__ = [
    # planted parameters
    "REFERENCE_MATRIX", "EFFECT_SIZES", "WASHIN_REF_PER_S", "WASHIN_LOG_SD", "WASHOUT_MEAN_PER_S",
    "WASHOUT_SD_PER_S", "NECROSIS_MAX", "NECROSIS_SLOPE", "NECROSIS_OFFSET", "COMBINED_EFFECT",
    "ORACLE_AUC", "SiteProfile", "SITES", "PlantedParams", "washin_rate_from_latent",
    "washout_rate_from_latent", "necrotic_fraction_from_latent", "oracle_score",
    "sample_planted_params", "xy_spacing_mm", "sample_clinical", "leakage_columns",
    # anatomy and rendering
    "UINT16_MAX", "ARTEFACT_FACTOR_RANGE", "CORE_ENHANCEMENT", "CORE_WASHIN", "RIM_WIDTH",
    "AIR", "FAT", "FGT", "SKIN", "MUSCLE", "BODY", "LUNG", "BLOOD", "TUMOUR", "BASE_SIGNAL",
    "KINETICS", "enhancement", "render_patient",
    # cohort and files
    "METADATA_COLUMNS", "PREVALENCE", "SPLIT_TRAIN", "SPLIT_TEST", "SPLIT_VALIDATION", "MIN_SIZE",
    "MIN_SLICES", "PatientPlan", "SyntheticPatient", "patient_rng", "mask_extent", "pid_for",
    "generate_patient", "plan_cohort", "image_paths", "save_nifti", "generate_cohort",
    # command line
    "main",
]


def __getattr__(name: str):
    # ``main`` lives in __main__.py and is imported on first access: importing it eagerly here
    # would make ``python -m data_prep.synthetic`` find the module already loaded (runpy warns).
    if name == "main":
        from data_prep.synthetic.__main__ import main
        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
