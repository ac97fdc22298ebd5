"""Evaluation of a trained run on a split (the library behind `python -m her2jax.evaluate`, whose
docstring lists the files written): slice probabilities through the shared inference path, the
patient table, metrics with intervals at the validation split's threshold, the report.
"""
from __future__ import annotations

import csv
import io
import json
import math
import sys
from typing import Any

import numpy as np
from etils import epath

from data_prep.params import IMAGE_PARAMETERS
from her2jax import files
from her2jax.analysis import metrics, stats
from her2jax.errors import BadInput
from her2jax.run_folder import RunFolder


class PreparationMismatch(BadInput):
    """The evaluated data was not prepared like the run's training data."""


def check_preparation(run_preparation: dict[str, Any], data_preparation: dict[str, Any],
                      data_dir: str, run_fit: Any = None, data_fit: Any = None,
                      check_fit: bool = False) -> None:
    """Raises PreparationMismatch naming every image parameter (and the normalisation fit) that
    differs between the run's training data and `data_dir`."""
    differences = [f"{key}: run {run_preparation.get(key)!r}, data {data_preparation.get(key)!r}"
                   for key in IMAGE_PARAMETERS
                   if _canonical(run_preparation.get(key)) != _canonical(data_preparation.get(key))]
    if check_fit and _canonical(run_fit) != _canonical(data_fit):
        differences.append("normalization_fit: the data was normalised with parameters fitted "
                           "elsewhere (prepare it with --fit_from the run's training dataset)")
    if differences:
        raise PreparationMismatch(
            f"{data_dir} was prepared differently from the run's training data: "
            + "; ".join(differences) + ". Prepare it with the run's parameters "
            "(python -m data_prep.prepare ... --like RUN)")


def _canonical(value: Any) -> Any:
    return json.loads(json.dumps(value))


def predict_slices(model: Any, data_dir: str, split: str, *, batch_size: int = 64,
                   dtype: str = "float32", progress: bool = True) -> dict[str, np.ndarray]:
    """The positive-class probability of every slice of `split`, in canonical order:
    {"patient_id", "cohort" (str objects), "slice_index", "label", "probability"}, with a
    progress bar (`inference.Predictor.split`)."""
    from her2jax.data import pipeline as input_pipeline
    from her2jax.training import inference

    builder = input_pipeline.require_split(data_dir, split)
    bar = _progress(builder.info.splits[split].num_examples, f"{split} slices", progress)
    try:
        return inference.Predictor.of(model, dtype=dtype).split(
            data_dir, split, batch_size=batch_size, progress=bar.update)
    finally:
        bar.close()


def patient_table(slices: dict[str, np.ndarray], aggregation: str) -> dict[str, np.ndarray]:
    """One row per patient: id, cohort, label, probability (slices aggregated), slices."""
    ids, probabilities, labels = metrics.aggregate_patients(
        slices["patient_id"], slices["probability"], slices["label"], method=aggregation)
    cohort = dict(zip(slices["patient_id"], slices["cohort"]))
    counts = dict(zip(*np.unique(slices["patient_id"].astype(str), return_counts=True)))
    return {"patient_id": np.array(ids, dtype=object),
            "cohort": np.array([cohort[i] for i in ids], dtype=object),
            "label": labels, "probability": probabilities,
            "slices": np.array([counts[i] for i in ids], np.int64)}


def f1(rates: dict[str, Any]) -> float:
    """F1 = 2 TP / (2 TP + FP + FN) (NaN when there is nothing positive at all)."""
    denominator = 2 * rates["tp"] + rates["fp"] + rates["fn"]
    return 2 * rates["tp"] / denominator if denominator else math.nan


def at_threshold(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    rates = metrics.threshold_metrics(labels, scores, threshold)
    return dict(rates, f1=f1(rates))


def slice_auc_ci(slices: dict[str, np.ndarray], *, samples: int, level: float,
                 seed: int) -> tuple[float, float]:
    """Bootstrap CI of the slice-level AUC resampling patients (with all their slices), within
    each class, so that correlated slices of one patient move together."""
    ids = slices["patient_id"].astype(str)
    patients, group = np.unique(ids, return_inverse=True)
    patient_label = np.zeros(patients.size, np.int64)
    patient_label[group] = slices["label"]
    positive, negative = np.flatnonzero(patient_label == 1), np.flatnonzero(patient_label == 0)
    if positive.size == 0 or negative.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    weights = np.zeros((samples, patients.size))
    weights[:, positive] = rng.multinomial(positive.size, np.full(positive.size, 1 / positive.size),
                                           size=samples)
    weights[:, negative] = rng.multinomial(negative.size, np.full(negative.size, 1 / negative.size),
                                           size=samples)
    slice_weights = weights[:, group]
    is_positive = slices["label"] == 1
    aucs = metrics.mann_whitney_auc(slices["probability"][is_positive],
                                    slices["probability"][~is_positive],
                                    slice_weights[:, is_positive], slice_weights[:, ~is_positive])
    alpha = 1 - level
    low, high = np.quantile(aucs, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def summarize(slices: dict[str, np.ndarray], *, aggregation: str, threshold: float,
              samples: int = 2000, level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Every number of metrics.json from slice predictions and the validation threshold."""
    table = patient_table(slices, aggregation)
    labels, scores = table["label"], table["probability"]
    low, high = metrics.bootstrap_auc_ci(labels, scores, samples=samples, level=level, seed=seed)
    slice_low, slice_high = slice_auc_ci(slices, samples=samples, level=level, seed=seed)
    baseline = metrics.majority_baseline(labels)
    calibration = stats.calibration_bins(labels, scores) if labels.size else None
    result = {
        "aggregation": aggregation,
        "ci_level": level, "bootstrap_samples": samples, "bootstrap_seed": seed,
        "patients": int(labels.size), "positives": int(labels.sum()),
        "negatives": int(labels.size - labels.sum()),
        "slices": int(slices["label"].size),
        "patient": {"auc": metrics.roc_auc(labels, scores), "auc_ci_low": low,
                    "auc_ci_high": high,
                    "at_validation_threshold": at_threshold(labels, scores, threshold),
                    "at_0.5": at_threshold(labels, scores, 0.5)},
        "slice": {"auc": metrics.roc_auc(slices["label"], slices["probability"]),
                  "auc_ci_low": slice_low, "auc_ci_high": slice_high},
        "majority_baseline": {"class": "HER2+" if baseline["majority_class"] else "HER2-",
                              "accuracy": baseline["accuracy"], "auc": baseline["auc"]},
        "calibration": None if calibration is None else {
            "brier": calibration["brier"],
            "expected_calibration_error": calibration["expected_calibration_error"]},
        "aggregations": {},
    }
    for rule in metrics.AGGREGATIONS:
        other = patient_table(slices, rule)
        rule_low, rule_high = metrics.bootstrap_auc_ci(other["label"], other["probability"],
                                                       samples=samples, level=level, seed=seed)
        result["aggregations"][rule] = {
            "auc": metrics.roc_auc(other["label"], other["probability"]),
            "auc_ci_low": rule_low, "auc_ci_high": rule_high}
    cohorts = sorted(set(table["cohort"]))
    if len(cohorts) > 1:
        result["cohorts"] = {}
        for cohort in cohorts:
            chosen = table["cohort"] == cohort
            c_low, c_high = metrics.bootstrap_auc_ci(labels[chosen], scores[chosen],
                                                     samples=samples, level=level, seed=seed)
            result["cohorts"][cohort] = {
                "patients": int(chosen.sum()), "positives": int(labels[chosen].sum()),
                "auc": metrics.roc_auc(labels[chosen], scores[chosen]),
                "auc_ci_low": c_low, "auc_ci_high": c_high,
                "at_validation_threshold": at_threshold(labels[chosen], scores[chosen],
                                                        threshold)}
    return result


def training_prior(config: Any) -> dict[str, float] | None:
    """The HER2+ prior the training loss saw against the training split's prevalence (slices),
    or None when they agree. With `loss.class_weights` (and with class balancing) the loss
    sees both classes equally often, so the raw probabilities are calibrated to a 50/50 prior
    and Brier, ECE and the figures at 0.5 look poor by construction."""
    from her2jax.data import records
    from her2jax.training.losses import class_weights_from_counts

    counts = records.class_counts(config.data_dir, config.train_split).astype(np.float64)
    if counts.size != 2 or (counts <= 0).any():
        return None
    mass = records.sampled_class_counts(config.data_dir, config.train_split,
                                        _setting(config, "input.balance", "none"))
    weights = (class_weights_from_counts(mass) if _setting(config, "loss.class_weights", False)
               else np.ones(2))
    seen = weights * mass
    prevalence, effective = float(counts[1] / counts.sum()), float(seen[1] / seen.sum())
    if abs(effective - prevalence) < 1e-6:
        return None
    return {"training_prevalence": prevalence, "effective_prior": effective}


def _setting(config: Any, dotted: str, default: Any) -> Any:
    """config.a.b, or `default` for a run recorded before the key existed."""
    node = config
    for part in dotted.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError):
            return default
    return node


def prior_correct(probabilities: np.ndarray, prevalence: float, effective: float) -> np.ndarray:
    """Bayes' prior shift: posteriors p under the class prior `effective` -> under `prevalence`,
    p' = p a / (p a + (1 - p) b), a = prevalence / effective, b = (1 - prevalence) /
    (1 - effective) (the likelihood ratio is unchanged; AUC and decisions at a threshold
    mapped the same way are unchanged)."""
    p = np.asarray(probabilities, np.float64)
    a, b = prevalence / effective, (1.0 - prevalence) / (1.0 - effective)
    return p * a / (p * a + (1.0 - p) * b)


def prior_corrected(slices: dict[str, np.ndarray], aggregation: str,
                    prior: dict[str, float]) -> dict[str, Any]:
    """Calibration and the figures at 0.5 on prior-corrected slice probabilities."""
    corrected = dict(slices, probability=prior_correct(
        slices["probability"], prior["training_prevalence"], prior["effective_prior"]))
    table = patient_table(corrected, aggregation)
    labels, scores = table["label"], table["probability"]
    calibration = stats.calibration_bins(labels, scores) if labels.size else None
    return {**prior,
            "calibration": None if calibration is None else {
                "brier": calibration["brier"],
                "expected_calibration_error": calibration["expected_calibration_error"]},
            "at_0.5": at_threshold(labels, scores, 0.5)}


def validation_threshold(restored: Any, *, aggregation: str, batch_size: int,
                         progress: bool) -> dict[str, Any]:
    """Youden's J threshold on the validation split of the run's training data (cached in
    RUN/eval/validation_threshold.json per checkpoint step and aggregation)."""
    config = restored.config
    cache = RunFolder(restored.workdir).validation_thresholds
    key = f"{restored.checkpoint}@{restored.step}/{aggregation}"
    cached = json.loads(cache.read_text(encoding="utf-8")) if cache.exists() else {}
    if key in cached:
        return cached[key]
    slices = predict_slices(restored.model, config.data_dir, config.eval_split,
                            batch_size=batch_size, dtype=config.dtype, progress=progress)
    table = patient_table(slices, aggregation)
    threshold = stats.youden_threshold(table["label"], table["probability"])
    entry = {"split": config.eval_split, "data_dir": config.data_dir,
             "patients": int(table["label"].size), "positives": int(table["label"].sum()),
             "auc": metrics.roc_auc(table["label"], table["probability"]),
             "youden_threshold": threshold,
             "threshold": threshold if math.isfinite(threshold) else 0.5,
             "note": "" if math.isfinite(threshold) else
             "validation split has one class only: the threshold falls back to 0.5"}
    cached[key] = entry
    if _writer():
        cache.parent.mkdir(parents=True, exist_ok=True)
        files.write_json(cache, cached, indent=2)
    return entry


def _writer() -> bool:
    """Only process 0 writes files (every process computes the same numbers)."""
    import jax

    return jax.process_index() == 0


def evaluate_run(workdir: str, *, split: str = "test", data_dir: str | None = None,
                 checkpoint: str = "best", out: str | None = None,
                 aggregation: str | None = None, samples: int = 2000, seed: int = 0,
                 batch_size: int = 64, progress: bool = True) -> dict[str, Any]:
    """Evaluates run `workdir` on `split` of `data_dir` (default: the run's own dataset) and
    writes the files listed in the module docstring; returns metrics.json's content."""
    from her2jax.data import pipeline as input_pipeline

    restored = RunFolder(workdir).restore(checkpoint)
    config = restored.config
    own_data = config.data_dir
    data_dir = data_dir or own_data
    aggregation = aggregation or config.eval.aggregation
    data_metadata = input_pipeline.preparation_metadata(data_dir)
    other_data = str(epath.Path(data_dir)) != str(epath.Path(own_data))
    run_fit = data_fit = None
    check_fit = False
    if other_data and (epath.Path(own_data) / "metadata.json").exists():
        run_fit = input_pipeline.preparation_metadata(own_data).get("normalization_fit")
        data_fit = data_metadata.get("normalization_fit")
        check_fit = run_fit is not None or data_fit is not None
    check_preparation(restored.preparation, data_metadata["preparation"], data_dir,
                      run_fit, data_fit, check_fit)

    chosen = validation_threshold(restored, aggregation=aggregation, batch_size=batch_size,
                                  progress=progress)
    slices = predict_slices(restored.model, data_dir, split, batch_size=batch_size,
                            dtype=config.dtype, progress=progress)
    result = summarize(slices, aggregation=aggregation, threshold=chosen["threshold"],
                       samples=samples, seed=seed)
    result = {"run": str(workdir), "checkpoint": restored.checkpoint, "step": restored.step,
              "model": config.model.name, "split": split, "data_dir": str(data_dir),
              "normalization": data_metadata["preparation"]["normalization"],
              "threshold": dict(chosen, value=chosen["threshold"]), **result}
    prior = training_prior(config)
    if prior is not None:
        result["prior_corrected"] = prior_corrected(slices, aggregation, prior)

    if not _writer():
        return result
    folder = epath.Path(out) if out else RunFolder(workdir).eval_dir(split, checkpoint)
    folder.mkdir(parents=True, exist_ok=True)
    files.write_json(folder / "metrics.json", result, indent=2)
    table = patient_table(slices, aggregation)
    decisions = (table["probability"] >= chosen["threshold"]).astype(int)
    _write_csv(folder / "predictions.csv",
               ["patient_id", "cohort", "label", "probability", "slices", "decision"],
               zip(table["patient_id"], table["cohort"], table["label"],
                   [exact(p) for p in table["probability"]], table["slices"], decisions))
    _write_csv(folder / "slice_predictions.csv",
               ["patient_id", "cohort", "slice_index", "label", "probability"],
               zip(slices["patient_id"], slices["cohort"], slices["slice_index"],
                   slices["label"], [exact(p) for p in slices["probability"]]))
    _figures(folder, table, result, chosen["threshold"], seed)
    files.write_text(folder / "report.md", report_markdown(result))
    return result


def exact(value: Any) -> str:
    """A probability as the shortest text that reads back to the same number: rounding would
    make ties that the model did not make (her2jax.compare reads these files)."""
    return np.format_float_positional(value, unique=True, trim="-")


def _figures(folder: epath.Path, table: dict[str, np.ndarray], result: dict[str, Any],
             threshold: float, seed: int) -> None:
    from her2jax.analysis import plots

    labels, scores = table["label"], table["probability"]
    if labels.size == 0 or labels.min() == labels.max():
        return
    rates = metrics.threshold_metrics(labels, scores, threshold)
    patient = result["patient"]
    plots.roc_figure([{
        "label": result["model"], "labels": labels, "scores": scores,
        "band": plots.roc_band(labels, scores, seed=seed),
        "operating_point": (1 - rates["specificity"], rates["sensitivity"]),
        "auc_text": f"AUC {patient['auc']:.3f} [{patient['auc_ci_low']:.3f}, "
                    f"{patient['auc_ci_high']:.3f}]"}], folder / "roc.png",
        title=f"{result['split']}: {result['patients']} patients; dot = validation threshold "
              f"{threshold:.3f}")
    plots.calibration_figure(stats.calibration_bins(labels, scores), scores,
                             folder / "calibration.png",
                             title=f"{result['split']}: {result['patients']} patients")


def _write_csv(path: epath.Path, header: list[str], rows: Any) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    files.write_text(path, buffer.getvalue())


def format_number(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) \
        else f"{value:.{digits}f}"


def report_markdown(result: dict[str, Any]) -> str:
    patient, slices = result["patient"], result["slice"]
    chosen, half = patient["at_validation_threshold"], patient["at_0.5"]
    level = int(round(result["ci_level"] * 100))
    lines = [
        f"# {result['model']} on `{result['split']}`",
        "",
        f"Run `{result['run']}`, checkpoint {result['checkpoint']} (step {result['step']}); data "
        f"`{result['data_dir']}` ({result['normalization']}). {result['patients']} patients "
        f"({result['positives']} HER2-positive), {result['slices']} slices; patient probability "
        f"= {result['aggregation']} of its slices.",
        "",
        f"**Patient-level AUC {format_number(patient['auc'])} "
        f"[{format_number(patient['auc_ci_low'])}, "
        f"{format_number(patient['auc_ci_high'])}]** ({level}% bootstrap interval, "
        f"{result['bootstrap_samples']} resamples of patients, seed {result['bootstrap_seed']}); "
        f"slice-level AUC {format_number(slices['auc'])} [{format_number(slices['auc_ci_low'])}, "
        f"{format_number(slices['auc_ci_high'])}].",
        "",
        "| threshold | accuracy | balanced acc. | sensitivity | specificity | PPV | NPV | F1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rates in ((f"validation Youden {format_number(chosen['threshold'])}", chosen),
                        ("0.5", half)):
        lines.append(f"| {name} | " + " | ".join(format_number(rates[k]) for k in (
            "accuracy", "balanced_accuracy", "sensitivity", "specificity", "ppv", "npv", "f1"))
            + " |")
    baseline = result["majority_baseline"]
    lines += [
        "",
        f"Majority-class baseline (always {baseline['class']}): accuracy "
        f"{format_number(baseline['accuracy'])}, AUC 0.5. The threshold was chosen on "
        f"{result['threshold']['split']} ({result['threshold']['patients']} patients) before "
        f"this split was scored. {result['threshold'].get('note', '')}".rstrip(),
        "",
        "| aggregation | patient AUC | CI |", "|---|---|---|",
    ]
    for rule, entry in result["aggregations"].items():
        lines.append(f"| {rule} | {format_number(entry['auc'])} | "
                     f"[{format_number(entry['auc_ci_low'])}, "
                     f"{format_number(entry['auc_ci_high'])}] |")
    if result.get("cohorts"):
        lines += ["", "| cohort | patients | HER2+ | AUC | CI | sensitivity | specificity |",
                  "|---|---|---|---|---|---|---|"]
        for cohort, entry in result["cohorts"].items():
            rates = entry["at_validation_threshold"]
            lines.append(f"| {cohort} | {entry['patients']} | {entry['positives']} | "
                         f"{format_number(entry['auc'])} | [{format_number(entry['auc_ci_low'])}, "
                         f"{format_number(entry['auc_ci_high'])}] | "
                         f"{format_number(rates['sensitivity'])} | "
                         f"{format_number(rates['specificity'])} |")
    if result.get("calibration"):
        lines += ["", f"Calibration: Brier score {format_number(result['calibration']['brier'])}, "
                      f"expected calibration error "
                      f"{format_number(result['calibration']['expected_calibration_error'])}."]
    corrected = result.get("prior_corrected")
    if corrected and corrected.get("calibration") and result.get("calibration"):
        raw, fixed = result["calibration"], corrected["calibration"]
        half_raw, half_fixed = patient["at_0.5"], corrected["at_0.5"]
        lines += ["", (
            f"Training saw HER2+ at a prior of {format_number(corrected['effective_prior'])} "
            f"(class weights or class balancing), while the training split's prevalence is "
            f"{format_number(corrected['training_prevalence'])}: the raw probabilities are "
            "calibrated to the former, so their Brier score, calibration error and figures at "
            "0.5 look poor by construction. On probabilities corrected to the training "
            f"prevalence (Bayes' prior shift; AUC unchanged): Brier score "
            f"{format_number(fixed['brier'])} (raw {format_number(raw['brier'])}), expected "
            f"calibration error {format_number(fixed['expected_calibration_error'])} (raw "
            f"{format_number(raw['expected_calibration_error'])}); at 0.5 accuracy "
            f"{format_number(half_fixed['accuracy'])} (raw {format_number(half_raw['accuracy'])}),"
            f" sensitivity {format_number(half_fixed['sensitivity'])} (raw "
            f"{format_number(half_raw['sensitivity'])}), specificity "
            f"{format_number(half_fixed['specificity'])} (raw "
            f"{format_number(half_raw['specificity'])}).")]
    lines += ["", "![ROC](roc.png) ![calibration](calibration.png)", "",
              "Per-patient predictions: `predictions.csv`; per slice: `slice_predictions.csv`."]
    return "\n".join(lines) + "\n"


def _progress(total: int, description: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="slice", disable=not enabled, leave=False,
                file=sys.stderr)
