"""DeLong variance and test, Youden threshold and calibration bins agree with brute force written
here, with scikit-learn, and with examples worked out by hand."""
import math
import warnings

import numpy as np
import pytest
from scipy.stats import rankdata
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, roc_auc_score
from sklearn.metrics import roc_curve as sklearn_roc_curve

from her2jax.analysis import metrics, stats

SEEDS = range(20)
Z_975 = 1.959963984540054  # Phi^{-1}(0.975)


def random_case(seed: int, n: int = 60, levels: int | None = None):
    """Labels with both classes (at least two of each) and scores; `levels` distinct values
    make ties."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    labels[:4] = (0, 1, 0, 1)
    scores = rng.random(n) if levels is None else rng.integers(0, levels, n) / levels
    return labels, scores


def brute_placements(labels, scores):
    """O(m * n) placements from the Heaviside kernel psi(x, y) = [x > y] + 0.5 [x == y]."""
    labels, scores = np.asarray(labels), np.asarray(scores, np.float64)
    positive, negative = scores[labels == 1], scores[labels == 0]
    psi = ((positive[:, None] > negative[None, :])
           + 0.5 * (positive[:, None] == negative[None, :]))
    return psi.mean(), psi.mean(axis=1), psi.mean(axis=0)


def brute_variance(labels, scores):
    auc, v10, v01 = brute_placements(labels, scores)
    s10 = sum((v - auc) ** 2 for v in v10) / (len(v10) - 1)
    s01 = sum((v - auc) ** 2 for v in v01) / (len(v01) - 1)
    return s10 / len(v10) + s01 / len(v01)


# ---------------------------------------------------------------------------------- DeLong


@pytest.mark.parametrize("seed", SEEDS)
def test_midranks_match_scipy(seed):
    values = np.random.default_rng(seed).integers(0, 8, 40).astype(np.float64)
    np.testing.assert_array_equal(stats._midranks(values), rankdata(values, method="average"))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("levels", [None, 3, 10])
def test_delong_auc_matches_sklearn(seed, levels):
    labels, scores = random_case(seed, levels=levels)
    auc, _, _ = stats.delong_placements(labels, scores)
    assert auc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert stats.delong_auc_variance(labels, scores)[0] == pytest.approx(auc, abs=1e-15)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("levels", [None, 4, 12])
def test_placements_and_variance_match_brute_force(seed, levels):
    labels, scores = random_case(seed, n=45 + seed, levels=levels)
    auc, v10, v01 = stats.delong_placements(labels, scores)
    brute_auc, brute_v10, brute_v01 = brute_placements(labels, scores)
    assert auc == pytest.approx(brute_auc, abs=1e-12)
    np.testing.assert_allclose(v10, brute_v10, rtol=0, atol=1e-12)
    np.testing.assert_allclose(v01, brute_v01, rtol=0, atol=1e-12)
    assert stats.delong_auc_variance(labels, scores)[1] == pytest.approx(
        brute_variance(labels, scores), rel=1e-10)


# Hand-worked example: 3 positives, 3 negatives (cases in this order).
#   labels                 1    1    1    0    0    0
#   score a (A)          0.8  0.6  0.4  0.6  0.3  0.2
#   score b (B)          0.7  0.5  0.2  0.5  0.4  0.1
# psi(x, y) = 1 if x > y, 1/2 if x == y, 0 otherwise; m = n = 3.
#
# Score A, positives x = (0.8, 0.6, 0.4) against negatives y = (0.6, 0.3, 0.2):
#   V10: 0.8 beats all three                 -> 3/3   = 1
#        0.6 ties 0.6, beats 0.3 and 0.2     -> 2.5/3 = 5/6
#        0.4 loses to 0.6, beats 0.3, 0.2    -> 2/3
#   V01: y = 0.6: 0.8 (1) + 0.6 (1/2) + 0.4 (0) -> 1.5/3 = 1/2
#        y = 0.3 and y = 0.2: all three above   -> 1, 1
#   AUC_A = (1 + 5/6 + 2/3) / 3 = (6 + 5 + 4)/18 = 5/6  (= (1/2 + 1 + 1)/3 too)
#   S10 = [(1/6)^2 + 0^2 + (-1/6)^2] / 2 = (2/36)/2 = 1/36
#   S01 = [(-1/3)^2 + (1/6)^2 + (1/6)^2] / 2 = (6/36)/2 = 1/12
#   Var(AUC_A) = S10/3 + S01/3 = 1/108 + 3/108 = 4/108 = 1/27
#
# Score B, positives x = (0.7, 0.5, 0.2) against negatives y = (0.5, 0.4, 0.1):
#   V10: 0.7 -> 1;   0.5 ties 0.5, beats 0.4, 0.1 -> 5/6;   0.2 beats only 0.1 -> 1/3
#   V01: y = 0.5: 0.7 (1) + 0.5 (1/2) + 0.2 (0) -> 1/2
#        y = 0.4: 0.7, 0.5 above, 0.2 below     -> 2/3
#        y = 0.1: all above                     -> 1
#   AUC_B = (6 + 5 + 2)/18 = 13/18
#   S10_BB = [(5/18)^2 + (2/18)^2 + (-7/18)^2] / 2 = (78/324)/2 = 13/108
#   S01_BB = [(-4/18)^2 + (-1/18)^2 + (5/18)^2] / 2 = (42/324)/2 = 7/108
#   Var(AUC_B) = (13/108 + 7/108) / 3 = 20/324 = 5/81
#
# Cross terms (deviations from the means, in 18ths):
#   V10: A (3, 0, -3), B (5, 2, -7):  S10_AB = (15 + 0 + 21)/324 / 2 = 1/18 = 6/108
#   V01: A (-6, 3, 3), B (-4, -1, 5): S01_AB = (24 - 3 + 15)/324 / 2 = 1/18 = 6/108
#   so S10 = [[3, 6], [6, 13]] / 108 and S01 = [[9, 6], [6, 7]] / 108.
# Paired test, D = AUC_A - AUC_B = 15/18 - 13/18 = 1/9:
#   c S10 c^T = (3 + 13 - 12)/108 = 4/108 = 1/27,  c S01 c^T = (9 + 7 - 12)/108 = 1/27
#   (the same as the sample variances of V10_A - V10_B = (0, 0, 1/3) and of
#   V01_A - V01_B = (0, 1/3, 0): mean 1/9, [2 (1/9)^2 + (2/9)^2] / 2 = 1/27)
#   Var(D) = (1/27)/3 + (1/27)/3 = 2/81,   SE = sqrt(2)/9
#   z = (1/9) / (sqrt(2)/9) = 1/sqrt(2) = 0.70710678...
#   p = 2 (1 - Phi(1/sqrt(2))) = erfc(1/2) = 0.47950012...
#   95% CI = 1/9 -+ 1.959963984540054 * sqrt(2)/9
HAND_LABELS = [1, 1, 1, 0, 0, 0]
HAND_A = [0.8, 0.6, 0.4, 0.6, 0.3, 0.2]
HAND_B = [0.7, 0.5, 0.2, 0.5, 0.4, 0.1]


def test_hand_worked_placements_and_variances():
    auc, v10, v01 = stats.delong_placements(HAND_LABELS, HAND_A)
    assert auc == pytest.approx(5 / 6, abs=1e-12)
    np.testing.assert_allclose(v10, [1, 5 / 6, 2 / 3], rtol=0, atol=1e-12)
    np.testing.assert_allclose(v01, [1 / 2, 1, 1], rtol=0, atol=1e-12)
    assert np.var(v10, ddof=1) == pytest.approx(1 / 36, abs=1e-12)
    assert np.var(v01, ddof=1) == pytest.approx(1 / 12, abs=1e-12)
    auc, variance = stats.delong_auc_variance(HAND_LABELS, HAND_A)
    assert (auc, variance) == pytest.approx((5 / 6, 1 / 27), abs=1e-12)

    auc_b, v10_b, v01_b = stats.delong_placements(HAND_LABELS, HAND_B)
    assert auc_b == pytest.approx(13 / 18, abs=1e-12)
    np.testing.assert_allclose(v10_b, [1, 5 / 6, 1 / 3], rtol=0, atol=1e-12)
    np.testing.assert_allclose(v01_b, [1 / 2, 2 / 3, 1], rtol=0, atol=1e-12)
    assert stats.delong_auc_variance(HAND_LABELS, HAND_B)[1] == pytest.approx(5 / 81, abs=1e-12)
    # The 2x2 covariance matrices of the comment.
    np.testing.assert_allclose(np.cov(np.stack([v10, v10_b])), np.array([[3, 6], [6, 13]]) / 108,
                               rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.cov(np.stack([v01, v01_b])), np.array([[9, 6], [6, 7]]) / 108,
                               rtol=0, atol=1e-12)


def test_hand_worked_paired_test():
    result = stats.delong_paired_test(HAND_LABELS, HAND_A, HAND_B)
    se = math.sqrt(2) / 9
    expected = {"auc_a": 5 / 6, "auc_b": 13 / 18, "difference": 1 / 9, "standard_error": se,
                "z": 1 / math.sqrt(2), "p_value": math.erfc(0.5),
                "ci_low": 1 / 9 - Z_975 * se, "ci_high": 1 / 9 + Z_975 * se, "level": 0.95}
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-12), key
    assert result["p_value"] == pytest.approx(0.4795001221869535, abs=1e-12)
    assert (result["positives"], result["negatives"]) == (3, 3)
    assert type(result["positives"]) is int and type(result["z"]) is float


@pytest.mark.parametrize("seed", range(10))
def test_paired_variance_is_the_contrast_of_the_covariance_matrices(seed):
    labels, a = random_case(seed, n=50, levels=8)
    b = np.round(a + np.random.default_rng(seed + 100).normal(0, 0.3, a.size), 1)
    _, a10, a01 = brute_placements(labels, a)
    _, b10, b01 = brute_placements(labels, b)
    covariance = np.cov(np.stack([a10, b10])) / a10.size + np.cov(np.stack([a01, b01])) / a01.size
    variance = covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1]
    result = stats.delong_paired_test(labels, a, b, level=0.9)
    assert result["standard_error"] == pytest.approx(math.sqrt(variance), rel=1e-10)
    assert result["difference"] == pytest.approx(roc_auc_score(labels, a)
                                                 - roc_auc_score(labels, b), abs=1e-12)
    half = 1.6448536269514722 * result["standard_error"]  # Phi^{-1}(0.95)
    assert result["ci_low"] == pytest.approx(result["difference"] - half, abs=1e-12)
    assert result["ci_high"] == pytest.approx(result["difference"] + half, abs=1e-12)


def test_identical_scores_give_no_difference():
    labels, scores = random_case(3, levels=6)
    for other in (scores, np.exp(3 * scores)):  # the same ranking gives the same placements
        result = stats.delong_paired_test(labels, scores, other)
        assert result["difference"] == 0.0 and result["standard_error"] == 0.0
        assert math.isnan(result["z"]) and result["p_value"] == 1.0
        assert result["ci_low"] == result["ci_high"] == 0.0


def test_zero_variance_with_a_difference_is_undefined():
    labels = [1, 1, 0, 0]
    result = stats.delong_paired_test(labels, [0.9, 0.8, 0.2, 0.1], [0.1, 0.2, 0.8, 0.9])
    assert result["difference"] == 1.0 and result["standard_error"] == 0.0
    assert math.isnan(result["z"]) and math.isnan(result["p_value"])
    assert result["ci_low"] == result["ci_high"] == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_swapping_the_scores_flips_the_sign(seed):
    labels, a = random_case(seed, n=80, levels=10)
    b = a + np.random.default_rng(seed).normal(0, 0.4, a.size)
    forward = stats.delong_paired_test(labels, a, b)
    backward = stats.delong_paired_test(labels, b, a)
    assert forward["difference"] != 0.0
    assert backward["difference"] == pytest.approx(-forward["difference"], abs=1e-15)
    assert backward["z"] == pytest.approx(-forward["z"], rel=1e-12)
    assert backward["p_value"] == pytest.approx(forward["p_value"], rel=1e-12)
    assert backward["standard_error"] == pytest.approx(forward["standard_error"], rel=1e-12)
    assert (backward["ci_low"], backward["ci_high"]) == pytest.approx(
        (-forward["ci_high"], -forward["ci_low"]), abs=1e-15)
    assert (backward["auc_a"], backward["auc_b"]) == (forward["auc_b"], forward["auc_a"])


def test_a_much_better_score_is_detected():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, 200)
    good = labels * 2.0 + rng.normal(size=200)
    poor = labels * 0.3 + rng.normal(size=200)
    result = stats.delong_paired_test(labels, good, poor)
    assert result["difference"] > 0.2 and result["z"] > 0
    assert result["p_value"] < 0.01
    assert result["ci_low"] > 0


def test_null_p_values_are_roughly_uniform():
    rng = np.random.default_rng(11)
    p_values = []
    for _ in range(200):
        signal = rng.normal(size=120)
        labels = (signal + rng.normal(size=120) > 0.8).astype(int)
        a = signal + rng.normal(size=120)     # two independent noisy copies of the same signal:
        b = signal + rng.normal(size=120)     # equal AUC in the population
        p_values.append(stats.delong_paired_test(labels, a, b)["p_value"])
    p_values = np.asarray(p_values)
    assert np.isfinite(p_values).all()
    assert 0.01 <= np.mean(p_values < 0.05) <= 0.12
    assert 0.38 <= np.mean(p_values < 0.5) <= 0.62


def test_variance_agrees_with_a_stratified_bootstrap():
    rng = np.random.default_rng(5)
    positive = np.round(rng.normal(1.0, 1.0, 60), 1)   # rounding makes ties
    negative = np.round(rng.normal(0.0, 1.0, 90), 1)
    labels = np.r_[np.ones(60, int), np.zeros(90, int)]
    auc, variance = stats.delong_auc_variance(labels, np.r_[positive, negative])
    samples = 4000
    positive_counts = rng.multinomial(60, np.full(60, 1 / 60), size=samples).astype(float)
    negative_counts = rng.multinomial(90, np.full(90, 1 / 90), size=samples).astype(float)
    aucs = metrics.mann_whitney_auc(positive, negative, positive_counts, negative_counts)
    assert 0.6 < auc < 0.9
    assert np.var(aucs, ddof=1) / variance == pytest.approx(1.0, abs=0.25)


# ---------------------------------------------------------------------------------- Youden


def sklearn_youden(labels, scores):
    fpr, tpr, thresholds = sklearn_roc_curve(labels, scores, drop_intermediate=False)
    finite = np.isfinite(thresholds)
    j, thresholds = (tpr - fpr)[finite], thresholds[finite]
    return thresholds[j >= j.max() - 1e-12].max()  # largest threshold among the (near) ties


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("levels", [None, 5, 20])
def test_youden_matches_a_brute_force_search(seed, levels):
    labels, scores = random_case(seed, levels=levels)
    threshold = stats.youden_threshold(labels, scores)
    assert threshold == sklearn_youden(labels, scores)
    assert threshold in scores
    j = metrics.threshold_metrics(labels, scores, threshold)
    for t in np.unique(scores):
        other = metrics.threshold_metrics(labels, scores, t)
        assert (other["sensitivity"] + other["specificity"]
                <= j["sensitivity"] + j["specificity"] + 1e-12)


def test_youden_hand_examples():
    # Tied scores: t = 0.9 -> TP 1, FP 0, J = 1/3;  t = 0.5 -> TP 3, FP 1, J = 1 - 1/2 = 1/2;
    # t = 0.2 -> TP 3, FP 2, J = 0.  Best: 0.5.
    assert stats.youden_threshold([0, 1, 1, 0, 1], [0.2, 0.5, 0.5, 0.5, 0.9]) == 0.5
    # Three-way tie, 3 positives and 3 negatives, scores from the top:
    #   0.9 (pos) J = 1/3 - 0;  0.8 (neg) 1/3 - 1/3 = 0;  0.7 (pos) 2/3 - 1/3 = 1/3;
    #   0.4 (neg) 0;  0.35 (pos) 1 - 2/3 = 1/3;  0.1 (neg) 0.
    # J = 1/3 at 0.9, 0.7 and 0.35: the largest, 0.9, wins. In floating point 1 - 2/3 exceeds
    # 1/3 - 0 by one ulp, so comparing tpr - fpr directly would pick 0.35.
    labels, scores = [0, 0, 1, 0, 1, 1], [0.1, 0.4, 0.35, 0.8, 0.7, 0.9]
    assert stats.youden_threshold(labels, scores) == 0.9
    # Perfect separation: the lowest positive score.
    assert stats.youden_threshold([0, 0, 1, 1], [0.1, 0.3, 0.6, 0.8]) == 0.6


# ----------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("bins", [1, 3, 7, 10])
def test_calibration_matches_sklearn(seed, bins):
    rng = np.random.default_rng(seed)
    probabilities = rng.random(80) ** 2
    # Values on or next to the bin edges, where the two bin conventions could differ.
    probabilities[:bins + 1] = np.linspace(0.0, 1.0, bins + 1)
    probabilities[bins + 1:2 * bins + 2] = np.arange(bins + 1) / bins
    labels = (rng.random(80) < probabilities).astype(int)
    result = stats.calibration_bins(labels, probabilities, bins=bins)
    fraction_positive, mean_predicted = calibration_curve(labels, probabilities, n_bins=bins,
                                                          strategy="uniform")
    np.testing.assert_allclose(result["fraction_positive"], fraction_positive, rtol=0, atol=1e-12)
    np.testing.assert_allclose(result["mean_predicted"], mean_predicted, rtol=0, atol=1e-12)
    assert result["count"].sum() == 80 and (result["count"] > 0).all()
    assert result["count"].dtype == np.int64
    assert result["brier"] == pytest.approx(brier_score_loss(labels, probabilities), abs=1e-12)
    ece = np.sum(result["count"] / 80 * np.abs(fraction_positive - mean_predicted))
    assert result["expected_calibration_error"] == pytest.approx(ece, abs=1e-12)


def test_calibration_hand_example():
    # bins = 2: [0, 0.5] holds 0.05, 0.15, 0.25, 0.35 with labels 0, 0, 1, 0
    #   -> mean 0.2, fraction 1/4, |gap| 0.05;
    # (0.5, 1] holds 0.85, 0.95 with labels 1, 1 -> mean 0.9, fraction 1, |gap| 0.1.
    # ECE = 4/6 * 0.05 + 2/6 * 0.1 = 1/30 + 1/30 = 1/15.
    # Brier = (0.05^2 + 0.15^2 + 0.75^2 + 0.35^2 + 0.15^2 + 0.05^2) / 6 = 0.735 / 6 = 0.1225.
    result = stats.calibration_bins([0, 0, 1, 0, 1, 1], [0.05, 0.15, 0.25, 0.35, 0.85, 0.95],
                                    bins=2)
    np.testing.assert_allclose(result["mean_predicted"], [0.2, 0.9], rtol=0, atol=1e-12)
    np.testing.assert_allclose(result["fraction_positive"], [0.25, 1.0], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(result["count"], [4, 2])
    assert result["expected_calibration_error"] == pytest.approx(1 / 15, abs=1e-12)
    assert result["brier"] == pytest.approx(0.1225, abs=1e-12)
    # An inner edge belongs to the lower bin, 0 and 1 to the first and last.
    edges = stats.calibration_bins([0, 1, 1], [0.0, 0.5, 1.0], bins=2)
    np.testing.assert_array_equal(edges["count"], [2, 1])


# --------------------------------------------------------------------- degenerate and invalid


@pytest.mark.parametrize("labels", [[1, 1, 1], [0, 0, 0], []])
def test_absent_class_gives_nan_without_warnings(labels):
    scores = [0.2, 0.5, 0.7][:len(labels)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auc, v10, v01 = stats.delong_placements(labels, scores)
        assert math.isnan(auc) and np.isnan(v10).all() and np.isnan(v01).all()
        assert v10.size + v01.size == len(labels)
        assert all(math.isnan(v) for v in stats.delong_auc_variance(labels, scores))
        result = stats.delong_paired_test(labels, scores, scores[::-1])
        for key in ("auc_a", "auc_b", "difference", "standard_error", "z", "p_value", "ci_low",
                    "ci_high"):
            assert math.isnan(result[key]), key
        assert result["positives"] + result["negatives"] == len(labels)
        assert math.isnan(stats.youden_threshold(labels, scores))
        calibration = stats.calibration_bins(labels, scores)
        if labels:  # one class is a valid calibration sample
            assert calibration["brier"] == pytest.approx(brier_score_loss(labels, scores))
        else:
            assert math.isnan(calibration["brier"])
            assert math.isnan(calibration["expected_calibration_error"])
            assert calibration["count"].size == 0


def test_single_member_class_has_an_auc_but_no_variance():
    labels, a, b = [1, 0, 0, 0], [0.9, 0.1, 0.5, 0.95], [0.15, 0.1, 0.5, 0.2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auc, variance = stats.delong_auc_variance(labels, a)
        assert auc == pytest.approx(2 / 3) and math.isnan(variance)
        result = stats.delong_paired_test(labels, a, b)
        assert result["difference"] == pytest.approx(2 / 3 - 1 / 3)
        assert all(math.isnan(result[k]) for k in ("standard_error", "z", "p_value", "ci_low"))


def test_invalid_inputs_raise():
    labels, scores = [0, 1, 0, 1], [0.1, 0.4, 0.35, 0.8]
    with pytest.raises(ValueError, match="same length"):
        stats.delong_paired_test(labels, scores, scores[:3])
    with pytest.raises(ValueError, match="same length"):
        stats.delong_paired_test(labels[:3], scores, scores)
    with pytest.raises(ValueError):
        stats.delong_placements(labels, scores[:3])
    with pytest.raises(ValueError):
        stats.delong_auc_variance(labels + [1], scores)
    with pytest.raises(ValueError):
        stats.youden_threshold(labels, scores[:3])
    with pytest.raises(ValueError):
        stats.calibration_bins(labels, scores[:3])
    with pytest.raises(ValueError, match="level"):
        stats.delong_paired_test(labels, scores, scores, level=1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        stats.calibration_bins(labels, [0.1, 0.4, 1.2, 0.8])
    with pytest.raises(ValueError, match="bins"):
        stats.calibration_bins(labels, scores, bins=0)
    with pytest.raises(ValueError, match="NaN"):
        stats.delong_placements(labels, [0.1, math.nan, 0.3, 0.4])


def test_compare_says_why_a_test_figure_is_undefined():
    from her2jax.compare import undefined_reason

    labels = [0, 0, 1, 1, 0, 1]
    scores = [0.1, 0.4, 0.35, 0.8, 0.2, 0.9]
    assert undefined_reason(stats.delong_paired_test(labels, scores, scores[::-1])) is None
    same = stats.delong_paired_test(labels, scores, [2 * s for s in scores])
    assert "rank the patients alike" in undefined_reason(same)
    perfect, inverted = [0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.3, 0.7, 0.8, 0.9]
    constant = stats.delong_paired_test(perfect, inverted, inverted[::-1])
    assert "one constant" in undefined_reason(constant)
    single = stats.delong_paired_test([0, 0, 1], [0.1, 0.5, 0.7], [0.2, 0.1, 0.9])
    assert "single patient" in undefined_reason(single)
    absent = stats.delong_paired_test([0, 0, 0], [0.1, 0.5, 0.7], [0.2, 0.1, 0.9])
    assert "both classes" in undefined_reason(absent)
