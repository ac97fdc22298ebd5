"""Inference on patient-level scores: DeLong AUC variance and paired test, Youden threshold,
calibration.

`her2jax.analysis.metrics` reports an AUC with a bootstrap interval; this module adds the analytic
(DeLong) variance of the AUC, the DeLong test that compares two models scored on the same
patients, the operating point that maximises Youden's J, and reliability-diagram bins.

DeLong, DeLong & Clarke-Pearson (1988). With m positives scored x_1..x_m, n negatives scored
y_1..y_n and the kernel
    psi(x, y) = [x > y] + 0.5 * [x == y]
the structural components (placement values) are
    V10_i = (1 / n) * sum_j psi(x_i, y_j)        one per positive
    V01_j = (1 / m) * sum_i psi(x_i, y_j)        one per negative
so AUC = mean_i V10_i = mean_j V01_j (the Mann-Whitney AUC of `metrics.roc_auc`), and
    Var(AUC) = S10 / m + S01 / n
with S10, S01 the sample variances (divisor m - 1, n - 1) of the V10 and V01.

The placements are computed in O((m + n) log(m + n)) from midranks (Sun & Xu 2014): with
Tz the midranks of the pooled scores (x_1..x_m, y_1..y_n), Tx those of the x among themselves
and Ty those of the y among themselves,
    V10_i = (Tz_i - Tx_i) / n,       V01_j = 1 - (Tz_{m+j} - Ty_j) / m
because a midrank is #{smaller} + (#{equal, itself included} + 1) / 2, so Tz_i - Tx_i counts
the negatives below x_i plus half of those equal to it.

Conventions follow `her2jax.analysis.metrics`: labels are 0/1 (1 = HER2-positive), a higher score means
more likely positive, an undefined quantity (a class absent, a variance from one sample, ...)
is NaN, never an exception or a warning, and everything is plain numpy (the normal
distribution comes from the standard library).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

from her2jax.analysis.metrics import binary_labels, checked_scores


def _midranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of `values` with each group of equal values given its average rank.

        rank_k = #{l: v_l < v_k} + (#{l: v_l == v_k} + 1) / 2
    """
    if values.size == 0:
        return np.zeros(0, np.float64)
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts_run = np.r_[True, ordered[1:] != ordered[:-1]]
    run = np.cumsum(starts_run) - 1
    first = np.flatnonzero(starts_run)                  # 0-based position of each run's start
    end = np.r_[first[1:], values.size]                  # one past each run's end
    ranks = np.empty(values.size, np.float64)
    ranks[order] = ((first + 1 + end) / 2.0)[run]        # mean of the 1-based ranks first+1..end
    return ranks


def delong_placements(labels: Sequence | np.ndarray, scores: Sequence | np.ndarray,
                      ) -> tuple[float, np.ndarray, np.ndarray]:
    """AUC and the DeLong placement values, ties counted 1/2.

        V10_i = (1 / n) * sum_j ([x_i > y_j] + 0.5 * [x_i == y_j])   for each positive x_i
        V01_j = (1 / m) * sum_i ([x_i > y_j] + 0.5 * [x_i == y_j])   for each negative y_j
        AUC   = mean(V10) = mean(V01)
    computed from midranks in O(N log N) (see the module docstring). Positives and negatives
    keep their order of appearance in `labels`.

    Returns:
        (auc, v10 of shape (m,), v01 of shape (n,)), float64. When a class is absent the AUC is
        NaN and the placements of the other class are NaN (there is nothing to place them
        against), without a warning.
    """
    y = binary_labels(labels)
    s = checked_scores(scores, y.size)
    positive, negative = s[y == 1], s[y == 0]
    m, n = positive.size, negative.size
    if m == 0 or n == 0:
        return math.nan, np.full(m, np.nan), np.full(n, np.nan)
    pooled = _midranks(np.concatenate((positive, negative)))
    v10 = (pooled[:m] - _midranks(positive)) / n
    v01 = 1.0 - (pooled[m:] - _midranks(negative)) / m
    return float(np.mean(v10)), v10, v01


def delong_auc_variance(labels: Sequence | np.ndarray, scores: Sequence | np.ndarray,
                        ) -> tuple[float, float]:
    """AUC and its DeLong variance estimate.

        S10 = (1 / (m - 1)) * sum_i (V10_i - AUC)^2
        S01 = (1 / (n - 1)) * sum_j (V01_j - AUC)^2
        Var(AUC) = S10 / m + S01 / n
    with the placements of `delong_placements`. The standard error is sqrt(Var(AUC)).

    Returns:
        (auc, variance). Both are NaN when a class is absent; the variance alone is NaN when a
        class has a single member (a sample variance needs two).
    """
    auc, v10, v01 = delong_placements(labels, scores)
    if v10.size < 2 or v01.size < 2 or math.isnan(auc):
        return auc, math.nan
    return auc, float(np.var(v10, ddof=1) / v10.size + np.var(v01, ddof=1) / v01.size)


def delong_paired_test(labels: Sequence | np.ndarray, scores_a: Sequence | np.ndarray,
                       scores_b: Sequence | np.ndarray, level: float = 0.95) -> dict:
    """DeLong test of AUC_a == AUC_b for two scores of the same patients (correlated ROC curves).

    With the placements of each score, k in {a, b}, the 2x2 covariance matrices
        S10[k, l] = (1 / (m - 1)) * sum_i (V10_i^k - AUC_k) * (V10_i^l - AUC_l)
        S01[k, l] = (1 / (n - 1)) * sum_j (V01_j^k - AUC_k) * (V01_j^l - AUC_l)
        S = S10 / m + S01 / n
    give, for the difference D = AUC_a - AUC_b and the contrast c = (1, -1),
        Var(D) = c S c^T = S[a, a] + S[b, b] - 2 S[a, b]
        SE = sqrt(Var(D)),   z = D / SE,   p = 2 * (1 - Phi(|z|))     (two-sided, normal)
        CI = D -+ Phi^{-1}(1 - alpha / 2) * SE,   alpha = 1 - level
    Var(D) is evaluated as S10_d / m + S01_d / n with S10_d, S01_d the sample variances of the
    placement differences V10^a - V10^b and V01^a - V01^b: by bilinearity of the sample
    covariance this is exactly c S c^T, and it is never negative through cancellation.

    Degenerate cases, all without a warning:
    - Var(D) == 0 and D == 0 (the placements agree, e.g. identical or monotonically
      related scores): standard_error 0, z NaN, p_value 1.0 (no evidence of a difference),
      CI (0, 0);
    - Var(D) == 0 and D != 0 (the placement differences are one constant, as when one score
      separates the classes perfectly and the other inverts them): z and p_value NaN, the
      test being undefined, CI (D, D);
    - a class with a single member: the AUCs and D are given, standard_error, z, p_value and
      the CI are NaN;
    - a class absent: every float is NaN.

    Returns:
        dict with auc_a, auc_b, difference (a - b), standard_error, z, p_value, ci_low,
        ci_high, level (floats) and positives, negatives (ints).

    Raises:
        ValueError: labels, scores_a and scores_b of different lengths, labels other than 0/1,
            NaN scores, or level outside (0, 1).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    y = binary_labels(labels)
    lengths = (y.size, np.asarray(scores_a).size, np.asarray(scores_b).size)
    if len(set(lengths)) != 1:
        raise ValueError("labels, scores_a and scores_b must have the same length, got "
                         f"{lengths[0]}, {lengths[1]} and {lengths[2]}")
    s_a = checked_scores(scores_a, y.size, "scores_a")
    s_b = checked_scores(scores_b, y.size, "scores_b")
    auc_a, v10_a, v01_a = delong_placements(y, s_a)
    auc_b, v10_b, v01_b = delong_placements(y, s_b)
    m, n = v10_a.size, v01_a.size
    difference = auc_a - auc_b
    if m < 2 or n < 2:
        variance = math.nan
    else:
        variance = float(np.var(v10_a - v10_b, ddof=1) / m + np.var(v01_a - v01_b, ddof=1) / n)
    standard_error = math.sqrt(variance) if not math.isnan(variance) else math.nan

    if math.isnan(standard_error) or standard_error == 0.0:
        z = math.nan
        p_value = 1.0 if standard_error == 0.0 and difference == 0.0 else math.nan
    else:
        z = difference / standard_error
        p_value = math.erfc(abs(z) / math.sqrt(2.0))     # = 2 * (1 - Phi(|z|))
    half_width = NormalDist().inv_cdf(1.0 - (1.0 - level) / 2.0) * standard_error
    return {
        "auc_a": auc_a,
        "auc_b": auc_b,
        "difference": float(difference),
        "standard_error": standard_error,
        "z": z,
        "p_value": p_value,
        "ci_low": float(difference - half_width),
        "ci_high": float(difference + half_width),
        "level": float(level),
        "positives": int(m),
        "negatives": int(n),
    }


def youden_threshold(labels: Sequence | np.ndarray, scores: Sequence | np.ndarray) -> float:
    """Threshold of the rule "positive if score >= t" that maximises Youden's J.

        J(t) = sensitivity(t) + specificity(t) - 1 = tpr(t) - fpr(t)
             = (TP(t) * n_neg - FP(t) * n_pos) / (n_pos * n_neg)
    searched over the distinct scores (the finite thresholds of `metrics.roc_curve`; the
    "nobody positive" threshold +inf, where J = 0, is never returned). J is compared through
    the integer numerator, so equal J values are recognised exactly. Ties in J go to the
    largest threshold, the most conservative rule (fewest patients called positive).

    Returns:
        the threshold as a float; NaN, without a warning, when a class is absent.
    """
    y = binary_labels(labels)
    s = checked_scores(scores, y.size)
    positives = int(y.sum())
    negatives = y.size - positives
    if positives == 0 or negatives == 0:
        return math.nan
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last_of_each = np.flatnonzero(np.r_[s[1:] != s[:-1], True])
    true_positives = np.cumsum(y)[last_of_each]
    false_positives = last_of_each + 1 - true_positives
    numerator = true_positives * negatives - false_positives * positives
    return float(s[last_of_each][np.argmax(numerator)])   # first maximum = largest threshold


def calibration_bins(labels: Sequence | np.ndarray, probabilities: Sequence | np.ndarray,
                     bins: int = 10) -> dict:
    """Reliability-diagram bins, expected calibration error and Brier score.

    The edges e_k = k / bins, k = 0..bins (numpy.linspace(0, 1, bins + 1)), cut [0, 1] into
    `bins` bins; as in sklearn.calibration.calibration_curve(strategy="uniform"), a probability
    equal to an inner edge falls in the lower bin, so bin 1 is [e_0, e_1] and bin k > 1 is
    (e_{k-1}, e_k]. For each non-empty bin B, over the N patients:
        count_B            = |B|
        mean_predicted_B   = (1 / |B|) * sum_{i in B} p_i
        fraction_positive_B = (1 / |B|) * sum_{i in B} y_i
        expected_calibration_error = sum_B (|B| / N) * |fraction_positive_B - mean_predicted_B|
        brier = (1 / N) * sum_i (p_i - y_i)^2
    mean_predicted and fraction_positive equal calibration_curve's prob_pred and prob_true,
    brier equals sklearn.metrics.brier_score_loss. A single class is fine here; with no
    patients the arrays are empty and both scores NaN.

    Returns:
        dict with mean_predicted, fraction_positive (float64 arrays), count (int64 array), all
        over the non-empty bins in increasing order, and expected_calibration_error, brier
        (floats).

    Raises:
        ValueError: bins < 1, probabilities outside [0, 1], NaN, mismatched lengths or labels
            other than 0/1.
    """
    if int(bins) != bins or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins}")
    bins = int(bins)
    y = binary_labels(labels)
    p = checked_scores(probabilities, y.size, "probabilities")
    if p.size and (p.min() < 0.0 or p.max() > 1.0):
        raise ValueError("probabilities must lie in [0, 1], found values in "
                         f"[{p.min()}, {p.max()}]")
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.searchsorted(edges[1:-1], p, side="left")
    count = np.bincount(index, minlength=bins)
    predicted = np.bincount(index, weights=p, minlength=bins)
    observed = np.bincount(index, weights=y.astype(np.float64), minlength=bins)
    present = count > 0
    count = count[present].astype(np.int64)
    mean_predicted = predicted[present] / count
    fraction_positive = observed[present] / count
    if y.size == 0:
        ece = brier = math.nan
    else:
        ece = float(np.sum(count / y.size * np.abs(fraction_positive - mean_predicted)))
        brier = float(np.mean((p - y) ** 2))
    return {
        "mean_predicted": mean_predicted,
        "fraction_positive": fraction_positive,
        "count": count,
        "expected_calibration_error": ece,
        "brier": brier,
    }
