"""Patient-level metrics agree with scikit-learn and with a plain groupby written here."""
import json
import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, roc_auc_score
from sklearn.metrics import roc_curve as sklearn_roc_curve

from her2jax.analysis import metrics

SEEDS = range(25)


def random_case(seed: int, n: int = 60, levels: int | None = None):
    """Labels with both classes and scores; `levels` distinct values make ties."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    labels[:2] = (0, 1)
    scores = rng.random(n) if levels is None else rng.integers(0, levels, n) / levels
    return labels, scores


def groupby(ids, probabilities, labels, reduce):
    """Reference aggregation: a dict of lists, one reduction per patient."""
    groups: dict[str, list[float]] = {}
    patient_label: dict[str, int] = {}
    for pid, probability, label in zip(ids, probabilities, labels):
        groups.setdefault(str(pid), []).append(float(probability))
        patient_label[str(pid)] = int(label)
    order = sorted(groups)
    return (order, np.array([reduce(np.array(groups[p])) for p in order]),
            np.array([patient_label[p] for p in order]))


def slice_cohort(seed: int, patients: int = 30):
    """Slices of `patients` patients, 1 to 6 slices each, with a patient-level label."""
    rng = np.random.default_rng(seed)
    patient_labels = rng.integers(0, 2, patients)
    slices = rng.integers(1, 7, patients)
    ids = np.repeat([f"P{i:03d}" for i in range(patients)], slices)
    labels = np.repeat(patient_labels, slices)
    probabilities = rng.random(ids.size)
    shuffle = rng.permutation(ids.size)
    return ids[shuffle], probabilities[shuffle], labels[shuffle]


def separable_cohort(patients: int, seed: int = 0):
    """Patient scores that separate the classes imperfectly (AUC around 0.75), 25% positive."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(patients) % 4 == 0).astype(int)
    return labels, rng.normal(0.0, 1.0, patients) + 0.95 * labels


# --- AUC and ROC curve -------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("levels", [None, 20, 3, 1])
def test_auc_equals_sklearn_with_ties(seed, levels):
    labels, scores = random_case(seed, levels=levels)
    assert metrics.roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores),
                                                            abs=1e-12)


def test_auc_of_known_cases():
    assert metrics.roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert metrics.roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert metrics.roc_auc([0, 1], [0.5, 0.5]) == 0.5
    # One tie among four pairs: (1 + 1 + 1 + 0.5) / 4.
    assert metrics.roc_auc([0, 0, 1, 1], [0.1, 0.3, 0.3, 0.4]) == 0.875


@pytest.mark.parametrize("labels", [[1, 1, 1], [0, 0], []])
def test_auc_with_one_class_is_nan_without_warnings(labels):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="raise"):
            assert math.isnan(metrics.roc_auc(labels, np.linspace(0, 1, len(labels))))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("levels", [None, 10, 2])
def test_roc_curve_equals_sklearn(seed, levels):
    labels, scores = random_case(seed, levels=levels)
    expected = sklearn_roc_curve(labels, scores, drop_intermediate=False)
    for ours, theirs in zip(metrics.roc_curve(labels, scores), expected):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)


def test_roc_curve_area_is_the_auc():
    labels, scores = random_case(7, levels=5)
    fpr, tpr, _ = metrics.roc_curve(labels, scores)
    area = np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)
    assert area == pytest.approx(metrics.roc_auc(labels, scores), abs=1e-12)


def test_roc_curve_with_one_class_has_nan_rate_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="raise"):
            fpr, tpr, thresholds = metrics.roc_curve([1, 1, 1], [0.2, 0.5, 0.5])
    assert np.isnan(fpr).all()
    np.testing.assert_array_equal(tpr, [0, 2 / 3, 1])
    np.testing.assert_array_equal(thresholds, [np.inf, 0.5, 0.2])


def test_bad_labels_and_scores_are_rejected():
    with pytest.raises(ValueError, match="0 or 1"):
        metrics.roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        metrics.roc_auc([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match="entries"):
        metrics.roc_auc([0, 1, 1], [0.1, 0.2])


# --- threshold metrics -------------------------------------------------------------------------

def divide(numerator, denominator):
    return numerator / denominator if denominator else math.nan


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.8])
def test_threshold_metrics_equal_confusion_matrix(seed, threshold):
    labels, scores = random_case(seed, levels=10)
    predicted = (scores >= threshold).astype(int)
    (tn, fp), (fn, tp) = confusion_matrix(labels, predicted, labels=[0, 1])
    result = metrics.threshold_metrics(labels, scores, threshold)
    assert (result["tp"], result["fp"], result["tn"], result["fn"]) == (tp, fp, tn, fn)
    expected = {
        "accuracy": (tp + tn) / labels.size,
        "sensitivity": divide(tp, tp + fn),
        "specificity": divide(tn, tn + fp),
        "ppv": divide(tp, tp + fp),
        "npv": divide(tn, tn + fn),
        "balanced_accuracy": balanced_accuracy_score(labels, predicted),
    }
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-12, nan_ok=True), key


def test_threshold_is_inclusive():
    result = metrics.threshold_metrics([1, 0], [0.5, 0.49], threshold=0.5)
    assert (result["tp"], result["tn"]) == (1, 1)


def test_undefined_threshold_metrics_are_nan():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = metrics.threshold_metrics([0, 0, 0], [0.1, 0.2, 0.3])
    assert result["specificity"] == 1.0 and result["npv"] == 1.0 and result["accuracy"] == 1.0
    for key in ("sensitivity", "ppv", "balanced_accuracy"):
        assert math.isnan(result[key]), key


# --- aggregation -------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("method, reduce", [("median", np.median), ("mean", np.mean),
                                            ("max", np.max)])
def test_aggregation_equals_groupby(seed, method, reduce):
    ids, probabilities, labels = slice_cohort(seed)
    ours = metrics.aggregate_patients(ids, probabilities, labels, method=method)
    expected = groupby(ids, probabilities, labels, reduce)
    assert ours[0] == expected[0]
    np.testing.assert_allclose(ours[1], expected[1], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(ours[2], expected[2])


def test_median_is_the_default_and_averages_the_middle_pair():
    ids, probabilities, labels = ["b", "a", "a", "a", "a"], [0.9, 0.4, 0.1, 0.3, 1.0], [0] * 5
    result = metrics.aggregate_patients(ids, probabilities, labels)
    assert result[0] == ["a", "b"]
    np.testing.assert_allclose(result[1], [0.35, 0.9])


def test_bytes_ids_are_decoded():
    result = metrics.aggregate_patients([b"ISPY2-1", "ISPY2-1"], [0.2, 0.4], [1, 1])
    assert result[0] == ["ISPY2-1"]
    np.testing.assert_allclose(result[1], [0.3])


def test_invalid_entries_are_ignored():
    ids, probabilities, labels = slice_cohort(3)
    padding = 7
    padded_ids = np.r_[ids, [""] * 3 + [ids[0]] * 4]
    padded_probs = np.r_[probabilities, np.full(padding, 1.0)]
    # Padding carries a conflicting label and an impossible one: neither may count.
    padded_labels = np.r_[labels, [5] * 3 + [1 - labels[0]] * 4]
    valid = np.r_[np.ones(ids.size, bool), np.zeros(padding, bool)]
    for method in metrics.AGGREGATIONS:
        ours = metrics.aggregate_patients(padded_ids, padded_probs, padded_labels, method, valid)
        clean = metrics.aggregate_patients(ids, probabilities, labels, method)
        assert ours[0] == clean[0]
        np.testing.assert_array_equal(ours[1], clean[1])
        np.testing.assert_array_equal(ours[2], clean[2])


def test_conflicting_labels_name_the_patient():
    with pytest.raises(ValueError, match="ISPY2-550421"):
        metrics.aggregate_patients(["ISPY1-1", "ISPY2-550421", "ISPY2-550421"],
                                   [0.1, 0.2, 0.3], [0, 1, 0])


def test_unknown_method_and_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="aggregation"):
        metrics.aggregate_patients(["a"], [0.1], [0], method="mode")
    with pytest.raises(ValueError, match="same length"):
        metrics.aggregate_patients(["a", "b"], [0.1], [0, 0])
    with pytest.raises(ValueError, match="valid"):
        metrics.aggregate_patients(["a"], [0.1], [0], valid=[True, False])


def test_all_invalid_gives_no_patients():
    ids, probs, labels = metrics.aggregate_patients(["a"], [0.1], [0], valid=[False])
    assert ids == [] and probs.size == 0 and labels.size == 0


# --- bootstrap ---------------------------------------------------------------------------------

def test_weighted_auc_equals_auc_of_the_repeated_data():
    rng = np.random.default_rng(0)
    positive, negative = rng.integers(0, 6, 9) / 5, rng.integers(0, 6, 14) / 5
    positive_counts, negative_counts = rng.integers(0, 4, (5, 9)), rng.integers(0, 4, (5, 14))
    positive_counts[:, 0] += 1
    negative_counts[:, 0] += 1
    ours = metrics.mann_whitney_auc(positive, negative, positive_counts.astype(float),
                                    negative_counts.astype(float))
    for row in range(5):
        scores = np.r_[np.repeat(positive, positive_counts[row]),
                       np.repeat(negative, negative_counts[row])]
        labels = np.r_[np.ones(positive_counts[row].sum()), np.zeros(negative_counts[row].sum())]
        assert ours[row] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def naive_bootstrap(labels, scores, samples, seed):
    """Reference: resample patients within each class in a loop (roc_auc is checked above)."""
    rng = np.random.default_rng(seed)
    positive, negative = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    aucs = []
    for _ in range(samples):
        pick = np.r_[rng.choice(positive, positive.size), rng.choice(negative, negative.size)]
        aucs.append(metrics.roc_auc(labels[pick], scores[pick]))
    return np.array(aucs)


@pytest.mark.parametrize("level", [0.95, 0.8])
def test_bootstrap_agrees_with_a_naive_loop(level):
    labels, scores = separable_cohort(120, seed=1)
    low, high = metrics.bootstrap_auc_ci(labels, scores, samples=4000, level=level, seed=0)
    reference = naive_bootstrap(labels, scores, samples=4000, seed=123)
    tail = (1 - level) / 2
    np.testing.assert_allclose([low, high], np.quantile(reference, [tail, 1 - tail]), atol=0.02)
    coverage = np.mean((reference >= low) & (reference <= high))
    assert coverage == pytest.approx(level, abs=0.02)


@pytest.mark.parametrize("seed", range(5))
def test_bootstrap_contains_the_estimate(seed):
    labels, scores = separable_cohort(80, seed=seed)
    low, high = metrics.bootstrap_auc_ci(labels, scores, seed=seed)
    assert low < metrics.roc_auc(labels, scores) < high


def test_bootstrap_narrows_with_more_patients():
    widths = []
    for patients in (40, 400):
        low, high = metrics.bootstrap_auc_ci(*separable_cohort(patients))
        widths.append(high - low)
    assert widths[1] < 0.5 * widths[0]


def test_wider_level_gives_wider_interval():
    labels, scores = separable_cohort(100)
    low90, high90 = metrics.bootstrap_auc_ci(labels, scores, level=0.90)
    low99, high99 = metrics.bootstrap_auc_ci(labels, scores, level=0.99)
    assert low99 < low90 < high90 < high99


def test_bootstrap_is_reproducible_for_a_seed():
    labels, scores = separable_cohort(60)
    first = metrics.bootstrap_auc_ci(labels, scores, samples=500, seed=4)
    assert metrics.bootstrap_auc_ci(labels, scores, samples=500, seed=4) == first
    assert metrics.bootstrap_auc_ci(labels, scores, samples=500, seed=5) != first


def test_bootstrap_keeps_both_classes_in_every_resample():
    # One positive among 40: unstratified resampling would lose it in ~37% of draws.
    labels = np.r_[1, np.zeros(39, int)]
    scores = np.r_[0.9, np.linspace(0.0, 1.0, 39)]
    low, high = metrics.bootstrap_auc_ci(labels, scores, samples=300)
    assert math.isfinite(low) and math.isfinite(high)
    assert 0.0 <= low <= high <= 1.0


def test_bootstrap_with_one_class_is_nan():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        low, high = metrics.bootstrap_auc_ci([0, 0, 0], [0.1, 0.2, 0.3])
    assert math.isnan(low) and math.isnan(high)


def test_bootstrap_rejects_bad_arguments():
    with pytest.raises(ValueError, match="level"):
        metrics.bootstrap_auc_ci([0, 1], [0.1, 0.2], level=1.5)
    with pytest.raises(ValueError, match="samples"):
        metrics.bootstrap_auc_ci([0, 1], [0.1, 0.2], samples=0)


# --- majority baseline and report --------------------------------------------------------------

def test_majority_baseline_on_78_22_labels():
    baseline = metrics.majority_baseline(np.r_[np.zeros(78, int), np.ones(22, int)])
    assert baseline == {"majority_class": 0, "accuracy": 0.78, "auc": 0.5}


def test_majority_baseline_follows_the_larger_class():
    baseline = metrics.majority_baseline([1, 1, 1, 0])
    assert baseline["majority_class"] == 1 and baseline["accuracy"] == 0.75


def report_case():
    ids, probabilities, labels = slice_cohort(11, patients=40)
    valid = np.ones(ids.size, bool)
    valid[::9] = False
    return ids, probabilities, labels, valid


@pytest.mark.parametrize("method", metrics.AGGREGATIONS)
def test_report_numbers_match_the_individual_functions(method):
    ids, probabilities, labels, valid = report_case()
    report = metrics.patient_report(ids, probabilities, labels, valid, method=method)
    pids, patient_probs, patient_labels = metrics.aggregate_patients(
        ids, probabilities, labels, method, valid)
    low, high = metrics.bootstrap_auc_ci(patient_labels, patient_probs)
    expected = {
        "aggregation": method,
        "patients": len(pids),
        "positives": int(patient_labels.sum()),
        "negatives": int((patient_labels == 0).sum()),
        "auc": metrics.roc_auc(patient_labels, patient_probs),
        "auc_ci_low": low,
        "auc_ci_high": high,
        "majority_accuracy": metrics.majority_baseline(patient_labels)["accuracy"],
        "slices": int(valid.sum()),
        "slice_auc": roc_auc_score(labels[valid], probabilities[valid]),
        **metrics.threshold_metrics(patient_labels, patient_probs),
    }
    for key, value in expected.items():
        assert report[key] == pytest.approx(value, abs=1e-12, nan_ok=True), key
    assert report["auc"] == pytest.approx(roc_auc_score(patient_labels, patient_probs))


def test_report_is_json_serialisable_with_plain_types():
    ids, probabilities, labels, valid = report_case()
    report = metrics.patient_report(ids, probabilities, labels, valid, samples=200)
    assert json.loads(json.dumps(report, allow_nan=True)) == report
    assert all(type(v) in (int, float, str) for v in report.values()), report


def test_report_of_a_one_class_split_is_nan_not_an_error():
    report = metrics.patient_report(["a", "a", "b"], [0.2, 0.4, 0.6], [0, 0, 0], samples=50)
    assert math.isnan(report["auc"]) and math.isnan(report["auc_ci_low"])
    assert math.isnan(report["slice_auc"]) and report["majority_accuracy"] == 1.0
    text = json.dumps(report, allow_nan=True)
    assert "NaN" in text
