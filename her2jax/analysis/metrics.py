"""Patient-level evaluation: slice probabilities -> patient probabilities -> AUC with a CI.

The model scores slices; HER2 status belongs to the patient. `aggregate_patients` reduces the
slice probabilities of each patient to one number (the median by default, the aggregation the
paper found best), and the metrics below are then computed over patients.

With about 22% HER2-positive patients an always-negative classifier is right ~78% of the time,
so accuracy alone says little: `patient_report` puts the AUC, its bootstrap confidence interval
and the majority-class baseline side by side.

Conventions:
- labels are 0/1 (1 = HER2-positive); scores are positive-class probabilities (or any score
  where higher means more likely positive);
- a quantity with a zero denominator (AUC with one class, sensitivity without positives, ...)
  is NaN, never an exception or a warning, so a tiny validation split cannot stop a run;
- everything is plain numpy.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

AGGREGATIONS = ("median", "mean", "max")


def binary_labels(labels: Sequence | np.ndarray, name: str = "labels") -> np.ndarray:
    """`labels` as a 1-D int64 array of 0/1; anything else is an error."""
    array = np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size and not np.isin(array, (0, 1)).all():
        found = np.unique(array[~np.isin(array, (0, 1))])[:5]
        raise ValueError(f"{name} must be 0 or 1, found {found.tolist()}")
    return array.astype(np.int64)


def checked_scores(scores: Sequence | np.ndarray, size: int, name: str = "scores") -> np.ndarray:
    """`scores` as a 1-D float64 array of length `size` without NaN."""
    array = np.asarray(scores, dtype=np.float64)
    if array.ndim != 1 or array.size != size:
        raise ValueError(f"{name} must be 1-D with {size} entries, got shape {array.shape}")
    if np.isnan(array).any():
        raise ValueError(f"{name} contain NaN")
    return array


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator) / denominator if denominator else math.nan


def _patient_key(value: object) -> str:
    # Identifiers read back from TFRecords arrive as bytes.
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8")
    return str(value)


def aggregate_patients(patient_ids: Sequence, probabilities: np.ndarray, labels: np.ndarray,
                       method: str = "median", valid: np.ndarray | None = None,
                       ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """One probability and one label per patient from slice-level predictions.

    For patient p with valid slices S_p:
        median: p_hat = median_{s in S_p} prob_s  (mean of the two middle values for even |S_p|)
        mean:   p_hat = (1 / |S_p|) * sum_{s in S_p} prob_s
        max:    p_hat = max_{s in S_p} prob_s

    Args:
        patient_ids: one identifier per slice; str, bytes (decoded as UTF-8) or anything with a
            str(); patients are compared and sorted by that string.
        probabilities: positive-class probability per slice, shape (n,).
        labels: 0/1 label per slice, shape (n,); every valid slice of a patient must agree.
        method: "median", "mean" or "max".
        valid: optional boolean mask, shape (n,); False marks padding from evaluation batches,
            whose id, probability and label are ignored entirely.

    Returns:
        (ids sorted ascending as str, float64 probabilities, int64 labels), aligned.

    Raises:
        ValueError: unknown method, mismatched lengths, NaN probabilities, labels other than
            0/1, or a patient whose slices carry different labels (the id is in the message).
    """
    if method not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {method!r}; choose one of {AGGREGATIONS}")
    ids = np.asarray([_patient_key(p) for p in patient_ids], dtype=object)
    keep = np.ones(ids.size, bool) if valid is None else np.asarray(valid, bool)
    if keep.shape != ids.shape:
        raise ValueError(f"valid has shape {keep.shape}, expected {ids.shape}")
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.shape != ids.shape or np.asarray(labels).shape != ids.shape:
        raise ValueError("patient_ids, probabilities and labels must have the same length, got "
                         f"{ids.size}, {probs.size} and {np.asarray(labels).size}")
    ids = ids[keep]
    probs = checked_scores(probs[keep], ids.size, "probabilities")
    slice_labels = binary_labels(np.asarray(labels)[keep])
    if ids.size == 0:
        return [], np.zeros(0, np.float64), np.zeros(0, np.int64)

    unique, group = np.unique(ids.astype(str), return_inverse=True)
    order = np.lexsort((probs, group))  # by patient, then by probability within the patient
    sorted_probs, sorted_labels = probs[order], slice_labels[order]
    counts = np.bincount(group, minlength=unique.size)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))

    low = np.minimum.reduceat(sorted_labels, starts)
    high = np.maximum.reduceat(sorted_labels, starts)
    if (low != high).any():
        conflicting = unique[low != high].tolist()
        raise ValueError(f"slices of patient(s) {conflicting} disagree on the label")

    if method == "median":
        patient_probs = (sorted_probs[starts + (counts - 1) // 2]
                         + sorted_probs[starts + counts // 2]) / 2.0
    elif method == "mean":
        patient_probs = np.add.reduceat(sorted_probs, starts) / counts
    else:
        patient_probs = np.maximum.reduceat(sorted_probs, starts)
    return unique.tolist(), patient_probs, low


def mann_whitney_auc(positive: np.ndarray, negative: np.ndarray,
                      positive_weights: np.ndarray, negative_weights: np.ndarray) -> np.ndarray:
    """Weighted Mann-Whitney AUC for each row of the weight matrices.

    With w_i the weight (multiplicity) of positive i and v_j that of negative j:
        AUC = sum_i w_i * sum_j v_j * ([s_i > s_j] + 0.5 * [s_i == s_j])
              / (sum_i w_i * sum_j v_j)
    Unit weights give the plain Mann-Whitney U / (n_pos * n_neg); bootstrap resampling counts
    give the AUC of each resample without materialising it. Cost O(rows * n).
    """
    order = np.argsort(negative, kind="stable")
    negative = negative[order]
    negative_weights = negative_weights[:, order]
    below = np.searchsorted(negative, positive, side="left")
    up_to = np.searchsorted(negative, positive, side="right")
    cumulative = np.concatenate(
        (np.zeros((negative_weights.shape[0], 1)), np.cumsum(negative_weights, axis=1)), axis=1)
    less = cumulative[:, below]
    equal = cumulative[:, up_to] - less
    wins = np.sum(positive_weights * (less + 0.5 * equal), axis=1)
    return wins / (positive_weights.sum(axis=1) * negative_weights.sum(axis=1))


def roc_auc(labels: Sequence | np.ndarray, scores: Sequence | np.ndarray) -> float:
    """Area under the ROC curve as the Mann-Whitney statistic, ties counted as 1/2.

        AUC = (1 / (n_pos * n_neg)) * sum_{i: y_i=1} sum_{j: y_j=0}
              ([s_i > s_j] + 0.5 * [s_i == s_j])

    This equals sklearn.metrics.roc_auc_score (the trapezoidal area under the full ROC curve).
    Returns NaN, without a warning, when fewer than two classes are present.
    """
    y = binary_labels(labels)
    s = checked_scores(scores, y.size)
    positive, negative = s[y == 1], s[y == 0]
    if positive.size == 0 or negative.size == 0:
        return math.nan
    return float(mann_whitney_auc(positive, negative, np.ones((1, positive.size)),
                                   np.ones((1, negative.size)))[0])


def roc_curve(labels: Sequence | np.ndarray, scores: Sequence | np.ndarray,
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points at every distinct score, as sklearn's roc_curve(drop_intermediate=False).

    thresholds = [+inf, t_1 > t_2 > ... > t_m] with t_k the distinct scores, and for each t:
        tpr(t) = #{i: y_i = 1, s_i >= t} / n_pos,   fpr(t) = #{i: y_i = 0, s_i >= t} / n_neg
    so the curve starts at (0, 0) and ends at (1, 1). Where a class is absent its rate is NaN;
    unlike sklearn this raises no warning.
    """
    y = binary_labels(labels)
    s = checked_scores(scores, y.size)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last_of_each = np.flatnonzero(np.r_[s[1:] != s[:-1], True]) if y.size else np.zeros(0, int)
    true_positives = np.r_[0, np.cumsum(y)[last_of_each]]
    false_positives = np.r_[0, last_of_each + 1 - true_positives[1:]]
    positives, negatives = int(y.sum()), int(y.size - y.sum())
    tpr = true_positives / positives if positives else np.full(true_positives.shape, np.nan)
    fpr = false_positives / negatives if negatives else np.full(false_positives.shape, np.nan)
    return fpr, tpr, np.r_[np.inf, s[last_of_each]]


def threshold_metrics(labels: Sequence | np.ndarray, scores: Sequence | np.ndarray,
                      threshold: float = 0.5) -> dict:
    """Confusion-matrix metrics of the rule "positive if score >= threshold".

        accuracy          = (TP + TN) / (TP + FP + TN + FN)
        sensitivity       = TP / (TP + FN)          (recall of positives, TPR)
        specificity       = TN / (TN + FP)          (recall of negatives, TNR)
        balanced_accuracy = (sensitivity + specificity) / 2
        ppv               = TP / (TP + FP)          (precision)
        npv               = TN / (TN + FN)
    A metric with a zero denominator is NaN; balanced accuracy is NaN unless both classes are
    present (sklearn's balanced_accuracy_score instead averages the recall of the classes
    present). Counts are returned as int under "tp", "fp", "tn", "fn".
    """
    y = binary_labels(labels)
    predicted = checked_scores(scores, y.size) >= threshold
    tp = int(np.sum(predicted & (y == 1)))
    fp = int(np.sum(predicted & (y == 0)))
    tn = int(np.sum(~predicted & (y == 0)))
    fn = int(np.sum(~predicted & (y == 1)))
    sensitivity, specificity = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    return {
        "threshold": float(threshold),
        "accuracy": _ratio(tp + tn, y.size),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "balanced_accuracy": (sensitivity + specificity) / 2.0,
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
    }


def bootstrap_auc_ci(labels: Sequence | np.ndarray, scores: Sequence | np.ndarray, *,
                     samples: int = 2000, level: float = 0.95, seed: int | None = 0,
                     ) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the AUC, resampling patients by class.

    Each of `samples` resamples draws n_pos positives from the positives and n_neg negatives
    from the negatives, with replacement, so every resample has both classes and the class
    balance of the data. With AUC_b the AUC of resample b and alpha = 1 - level:
        CI = (quantile_{alpha/2}(AUC_b), quantile_{1 - alpha/2}(AUC_b))
    (numpy's linear quantile interpolation). (NaN, NaN) when a class is absent. The same seed
    gives the same interval.
    """
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    y = binary_labels(labels)
    s = checked_scores(scores, y.size)
    positive, negative = s[y == 1], s[y == 0]
    if positive.size == 0 or negative.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    # Drawing with replacement is the same as multinomial counts over the original patients.
    positive_counts = rng.multinomial(positive.size, np.full(positive.size, 1.0 / positive.size),
                                      size=samples)
    negative_counts = rng.multinomial(negative.size, np.full(negative.size, 1.0 / negative.size),
                                      size=samples)
    aucs = mann_whitney_auc(positive, negative, positive_counts.astype(np.float64),
                             negative_counts.astype(np.float64))
    alpha = 1.0 - level
    low, high = np.quantile(aucs, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def majority_baseline(labels: Sequence | np.ndarray) -> dict:
    """The classifier that always predicts the most frequent class.

        accuracy = max(n_pos, n_neg) / n
    Ties go to the negative class. Its scores are constant, so its AUC is 0.5 (NaN when a class
    is absent, as for `roc_auc`); accuracy is NaN for no labels.
    """
    y = binary_labels(labels)
    positives = int(y.sum())
    majority = int(positives > y.size - positives)
    return {
        "majority_class": majority,
        "accuracy": _ratio(max(positives, y.size - positives), y.size),
        "auc": roc_auc(y, np.zeros(y.size)),
    }


def patient_report(patient_ids: Sequence, probabilities: np.ndarray, labels: np.ndarray,
                   valid: np.ndarray | None = None, method: str = "median", *,
                   threshold: float = 0.5, samples: int = 2000, level: float = 0.95,
                   seed: int | None = 0) -> dict:
    """Every metric above at patient level, plus the slice-level AUC, as one JSON-ready dict.

    Slices are aggregated with `aggregate_patients(method)`; then, over patients:
    `auc` (roc_auc), `auc_ci_low`/`auc_ci_high` (bootstrap_auc_ci at `level`), the
    `threshold_metrics` keys (accuracy, sensitivity, specificity, balanced_accuracy, ppv, npv,
    tp, fp, tn, fn, threshold), `majority_accuracy` and `majority_class` (majority_baseline),
    the counts `patients`, `positives`, `negatives`, and `aggregation`. `slice_auc` and
    `slices` describe the valid slices before aggregation. Values are Python floats, ints and
    strings; undefined metrics are NaN (her2jax.files writes them as null, with the reason).
    """
    ids, patient_probs, patient_labels = aggregate_patients(
        patient_ids, probabilities, labels, method=method, valid=valid)
    keep = (np.ones(len(patient_ids), bool) if valid is None else np.asarray(valid, bool))
    slice_labels = binary_labels(np.asarray(labels)[keep])
    slice_probs = np.asarray(probabilities, np.float64)[keep]
    low, high = bootstrap_auc_ci(patient_labels, patient_probs, samples=samples, level=level,
                                 seed=seed)
    baseline = majority_baseline(patient_labels)
    positives = int(patient_labels.sum())
    return {
        "aggregation": method,
        "patients": len(ids),
        "positives": positives,
        "negatives": len(ids) - positives,
        "auc": roc_auc(patient_labels, patient_probs),
        "auc_ci_low": low,
        "auc_ci_high": high,
        "ci_level": float(level),
        "bootstrap_samples": int(samples),
        **threshold_metrics(patient_labels, patient_probs, threshold),
        "majority_accuracy": baseline["accuracy"],
        "majority_class": baseline["majority_class"],
        "slices": int(slice_labels.size),
        "slice_auc": roc_auc(slice_labels, slice_probs),
    }
