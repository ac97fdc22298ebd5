"""Evaluation, comparison, external validation and prediction on a tiny trained run: every
metric against scikit-learn, the threshold fixed on validation only, the refusal of data prepared
differently, and predict == evaluate for one patient."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import types

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from configs import resnet
from conftest import assert_strict_json_tree, strict_json, write_cohort
from data_prep import prepare
from her2jax import compare, evaluate, predict
from her2jax.analysis import comparison, evaluation, prediction, stats
from her2jax.run_folder import RunFolder
from her2jax.training import loop as train

# 18 patients, HER2+ where i % 3 == 0: validation {3+, 4, 5, 7}, test {0+, 1, 2, 6+}
SPLITS = [1, 1, 1, 2, 2, 2, 1, 2] + [0] * 10   # 1 = test, 2 = validation


def run_prepare(*args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert prepare.main([*args, "--workers", "1", "--quiet"]) == 0
    return out.getvalue().splitlines()[-1]


def tiny_run(data_dir: str, workdir: str, seed: int = 0) -> str:
    config = resnet.get_config("resnet18,runlocal")
    config.data_dir = data_dir
    config.seed = seed
    config.batch_size = 4
    config.eval.batch_size = 5
    train.train_and_evaluate(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    cohort = str(root / "cohort")
    rows = write_cohort(cohort, patients=18, splits=SPLITS)
    data_dir = run_prepare("--source", cohort, "--data_dir", str(root / "prepared"),
                           "--image_size", "16")
    run_a = tiny_run(data_dir, str(root / "run_a"))
    run_b = tiny_run(data_dir, str(root / "run_b"), seed=1)
    return {"root": root, "cohort": cohort, "rows": rows, "data_dir": data_dir,
            "run_a": run_a, "run_b": run_b,
            "result": evaluation.evaluate_run(run_a, split="test", samples=300, progress=False)}


def read_csv(path: str) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_files_and_every_metric_against_sklearn(setup):
    result, folder = setup["result"], os.path.join(setup["run_a"], "eval", "test")
    for name in ("metrics.json", "predictions.csv", "slice_predictions.csv", "roc.png",
                 "calibration.png", "report.md"):
        assert os.path.getsize(os.path.join(folder, name)) > 0, name
    assert strict_json(os.path.join(folder, "metrics.json"))["step"] == result["step"]
    assert_strict_json_tree(setup["run_a"])     # metrics.jsonl, config.json, the thresholds
    patients = read_csv(os.path.join(folder, "predictions.csv"))
    slices = read_csv(os.path.join(folder, "slice_predictions.csv"))
    assert sorted(p["patient_id"] for p in patients) == ["T-000", "T-001", "T-002", "T-006"]
    assert len(slices) == result["slices"] == sum(int(p["slices"]) for p in patients)
    # patient probability = median of its slices
    for patient in patients:
        mine = [float(s["probability"]) for s in slices if s["patient_id"] == patient["patient_id"]]
        assert float(patient["probability"]) == pytest.approx(np.median(mine), abs=2e-6)
    y = np.array([int(p["label"]) for p in patients])
    p = np.array([float(p["probability"]) for p in patients])
    assert result["patient"]["auc"] == pytest.approx(skm.roc_auc_score(y, p), abs=1e-5)
    ys = np.array([int(s["label"]) for s in slices])
    ps = np.array([float(s["probability"]) for s in slices])
    assert result["slice"]["auc"] == pytest.approx(skm.roc_auc_score(ys, ps), abs=1e-5)
    for key, threshold in (("at_validation_threshold", result["threshold"]["value"]),
                           ("at_0.5", 0.5)):
        rates = result["patient"][key]
        predicted = (p >= threshold).astype(int)
        tn, fp, fn, tp = skm.confusion_matrix(y, predicted, labels=[0, 1]).ravel()
        assert (rates["tp"], rates["fp"], rates["tn"], rates["fn"]) == (tp, fp, tn, fn)
        assert rates["accuracy"] == pytest.approx(skm.accuracy_score(y, predicted))
        assert rates["sensitivity"] == pytest.approx(skm.recall_score(y, predicted))
        assert rates["specificity"] == pytest.approx(
            skm.recall_score(y, predicted, pos_label=0))
        assert rates["balanced_accuracy"] == pytest.approx(
            skm.balanced_accuracy_score(y, predicted))
        assert rates["f1"] == pytest.approx(skm.f1_score(y, predicted, zero_division=np.nan),
                                            nan_ok=True)
    assert result["majority_baseline"]["accuracy"] == pytest.approx(0.5)
    assert result["patients"] == 4 and result["positives"] == 2
    low, high = result["patient"]["auc_ci_low"], result["patient"]["auc_ci_high"]
    assert low <= result["patient"]["auc"] <= high
    assert set(result["aggregations"]) == {"median", "mean", "max"}
    report = open(os.path.join(folder, "report.md")).read()
    assert f"{result['patient']['auc']:.3f}" in report and "roc.png" in report


def test_threshold_is_fixed_on_validation_only(setup):
    result = setup["result"]
    restored = RunFolder(setup["run_a"]).restore("best")
    validation = evaluation.predict_slices(restored.model, setup["data_dir"], "validation",
                                           progress=False)
    table = evaluation.patient_table(validation, "median")
    assert list(table["patient_id"]) == ["T-003", "T-004", "T-005", "T-007"]
    expected = stats.youden_threshold(table["label"], table["probability"])
    assert result["threshold"]["value"] == pytest.approx(expected)
    assert result["threshold"]["split"] == "validation"
    # evaluating another split takes its threshold from validation, never from the evaluated
    # split: recomputed here (the cache of thresholds removed), on a split whose own Youden
    # threshold differs, so that a threshold taken from the evaluated split would show
    train = evaluation.patient_table(evaluation.predict_slices(
        restored.model, setup["data_dir"], "train", progress=False), "median")
    assert stats.youden_threshold(train["label"], train["probability"]) != \
        pytest.approx(expected)
    RunFolder(setup["run_a"]).validation_thresholds.unlink()
    other = evaluation.evaluate_run(setup["run_a"], split="train", samples=50, progress=False,
                                    out=str(setup["root"] / "train_eval"))
    assert other["threshold"]["value"] == pytest.approx(expected)
    assert other["threshold"]["split"] == "validation"


def test_prior_correction_is_bayes_rule_against_exact_posteriors():
    """Two Gaussian classes: the exact posterior under one prior, corrected, is the exact
    posterior under the other (computed here from the likelihoods)."""
    from scipy import stats as scipy_stats

    x = np.linspace(-4, 5, 91)
    f0, f1 = scipy_stats.norm.pdf(x, 0, 1), scipy_stats.norm.pdf(x, 1.5, 1.2)

    def posterior(prior):
        return prior * f1 / (prior * f1 + (1 - prior) * f0)

    for effective, prevalence in ((0.5, 0.17), (0.3, 0.1), (0.2, 0.6)):
        np.testing.assert_allclose(
            evaluation.prior_correct(posterior(effective), prevalence, effective),
            posterior(prevalence), rtol=1e-12, atol=1e-15)


def test_class_weights_report_calibration_on_prior_corrected_probabilities(setup, tmp_path):
    """The run trained with class weights (the default): metrics.json keeps the raw figures and
    adds the prior-corrected ones, computed here from the predictions; report.md says so. The
    same run recorded without weights or balancing has nothing to correct."""
    from her2jax.data import records

    result, folder = setup["result"], os.path.join(setup["run_a"], "eval", "test")
    corrected = result["prior_corrected"]
    counts = records.class_counts(setup["data_dir"], "train")
    prevalence = counts[1] / counts.sum()
    assert prevalence < 0.45
    assert corrected["training_prevalence"] == pytest.approx(prevalence)
    assert corrected["effective_prior"] == pytest.approx(0.5)
    slices = read_csv(os.path.join(folder, "slice_predictions.csv"))
    raw = np.array([float(s["probability"]) for s in slices])
    fixed = evaluation.prior_correct(raw, prevalence, 0.5)
    assert (fixed < raw).all()                         # a rarer class: probabilities lowered
    by_patient = {}
    for row, p in zip(slices, fixed):
        by_patient.setdefault(row["patient_id"], (int(row["label"]), []))[1].append(p)
    y = np.array([label for label, _ in by_patient.values()])
    p = np.array([np.median(ps) for _, ps in by_patient.values()])
    assert corrected["calibration"]["brier"] == pytest.approx(
        skm.brier_score_loss(y, p), abs=1e-6)
    assert corrected["at_0.5"]["accuracy"] == pytest.approx(
        skm.accuracy_score(y, (p >= 0.5).astype(int)))
    report = open(os.path.join(folder, "report.md"), encoding="utf-8").read()
    assert "corrected to the training prevalence" in report

    run = str(tmp_path / "unweighted")
    shutil.copytree(setup["run_a"], run)
    config_file = os.path.join(run, "config.json")
    config = json.load(open(config_file, encoding="utf-8"))
    config["loss"]["class_weights"] = False
    with open(config_file, "w", encoding="utf-8") as handle:
        json.dump(config, handle)
    plain = evaluation.evaluate_run(run, split="test", samples=50, progress=False)
    assert "prior_corrected" not in plain
    assert plain["calibration"] == result["calibration"]      # the raw figures, unchanged


def test_the_best_checkpoint_is_the_step_of_the_top_validation_auc(setup):
    """Of equal validation AUCs the later step is kept (a save replaces an equal one)."""
    records = [json.loads(line) for line in
               open(os.path.join(setup["run_a"], "metrics.jsonl"), encoding="utf-8")]
    validation = [(r["step"], r["auc"]) for r in records
                  if r.get("split") == "validation" and r.get("auc") is not None
                  and np.isfinite(r["auc"])]
    assert len(validation) > 1
    top = max(auc for _, auc in validation)
    assert RunFolder(setup["run_a"]).restore("best").step == \
        [step for step, auc in validation if auc == top][-1]


@settings(max_examples=200, deadline=None)
@given(value=st.floats(0, 1, width=32) | st.floats(0, 1))
def test_probabilities_are_written_in_full(value):
    """predictions.csv text reads back to the very number (no ties made by rounding)."""
    for kind in (np.float32, np.float64):
        number = kind(value)
        assert kind(evaluation.exact(number)) == number


def test_one_inference_path_for_splits_and_images(setup):
    """A split read in padded batches (3 does not divide it) and the same images passed at
    once give the model's own softmax, slice for slice in canonical order."""
    import jax
    import jax.numpy as jnp

    from her2jax.data import pipeline as input_pipeline
    from her2jax.training import inference
    from her2jax.training.steps import normalize_images

    restored = RunFolder(setup["run_a"]).restore("best")
    examples = input_pipeline.read_examples(setup["data_dir"], "validation")
    assert len(examples["image"]) % 3
    predictor = inference.Predictor.of(restored.model)
    rows = predictor.split(setup["data_dir"], "validation", batch_size=3)
    for key in ("patient_id", "cohort", "slice_index", "label"):
        assert list(rows[key]) == list(examples[key])
    direct = jax.nn.softmax(restored.model(normalize_images(jnp.asarray(examples["image"]))),
                            axis=-1)[:, 1]
    np.testing.assert_allclose(rows["probability"], np.asarray(direct), atol=1e-6)
    np.testing.assert_allclose(predictor.images(examples["image"]), rows["probability"],
                               atol=1e-6)
    with pytest.raises(input_pipeline.MissingSplit, match="'holdout'.*no such split"):
        predictor.split(setup["data_dir"], "holdout", batch_size=3)


def test_data_prepared_differently_is_refused_naming_the_parameters(setup):
    other = run_prepare("--source", setup["cohort"], "--data_dir",
                        str(setup["root"] / "other"), "--image_size", "24",
                        "--normalization", "global_minmax")
    with pytest.raises(evaluation.PreparationMismatch) as error:
        evaluation.evaluate_run(setup["run_a"], data_dir=other, progress=False)
    message = str(error.value)
    assert "normalization" in message and "image_size" in message and "n4" not in message
    assert evaluate.main(["--workdir", setup["run_a"], "--data_dir", other, "--quiet"]) == 1


def test_external_cohort_prepared_like_the_run(setup, capsys):
    external_source = str(setup["root"] / "external_cohort")
    write_cohort(external_source, patients=6, seed=5)
    # --like copies the run's parameters; a contradicting flag is refused
    with pytest.raises(SystemExit):
        prepare.parse_args(["--source", external_source, "--data_dir", "x",
                            "--like", setup["run_a"], "--image_size", "32"])
    external = run_prepare("--source", external_source, "--data_dir",
                           str(setup["root"] / "external"), "--like", setup["run_a"],
                           "--external", "hospital_b")
    assert evaluate.main(["--workdir", setup["run_a"], "--data_dir", external,
                          "--split", "external", "--quiet", "--bootstrap", "50"]) == 0
    printed = capsys.readouterr().out
    result = json.load(open(os.path.join(setup["run_a"], "eval", "external", "metrics.json")))
    assert result["patients"] == 6 and result["data_dir"] == external
    assert "patient AUC" in printed


def test_predict_gives_the_probability_evaluate_gives(setup, tmp_path, capsys):
    """No --layout: the run was trained on BreastDCEDL-layout data, so its files are read (z, y, x)
    and the patient is named without the phase suffix."""
    cohort, patient = setup["cohort"], "T-006"
    files = [os.path.join(cohort, "dce", f"{patient}_spy2_vis1_dce_aqc_{t}.nii.gz")
             for t in (0, 1, 3)]
    mask = os.path.join(cohort, "mask", f"{patient}_spy2_vis1_mask.nii.gz")
    assert predict.main(["--workdir", setup["run_a"], "--pre", files[0], "--early", files[1],
                         "--late", files[2], "--mask", mask, "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr()
    assert printed.err == ""                      # no warning: the run's record decided
    result = json.loads(printed.out)
    assert result["patient_id"] == patient
    assert result["inputs"]["layout"] == "breastdcedl"
    assert result["inputs"]["layout_from"] == "run"
    rows = read_csv(os.path.join(setup["run_a"], "eval", "test", "predictions.csv"))
    expected = next(float(r["probability"]) for r in rows if r["patient_id"] == patient)
    assert result["probability"] == pytest.approx(expected, abs=1e-5)
    slices = read_csv(os.path.join(setup["run_a"], "eval", "test", "slice_predictions.csv"))
    mine = {int(s["slice_index"]): float(s["probability"]) for s in slices
            if s["patient_id"] == patient}
    assert {s["slice_index"]: pytest.approx(s["probability"], abs=1e-5)
            for s in result["slices"]} == mine
    assert set(mine) <= set(range(3, 7))          # the tumour's slices on the z axis
    threshold = setup["result"]["threshold"]["value"]
    assert result["threshold"] == threshold
    assert result["decision"] == ("HER2-positive" if expected >= threshold else "HER2-negative")
    assert json.load(open(tmp_path / "out" / "prediction.json"))["probability"] == \
        result["probability"]


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    (line,) = err.strip().splitlines()
    assert line.startswith("error: ")
    return line


def test_predict_reads_the_layout_from_the_run_and_refuses_what_nothing_decides(setup, tmp_path,
                                                                                capsys):
    cohort = setup["cohort"]
    files = [os.path.join(cohort, "dce", f"T-006_spy2_vis1_dce_aqc_{t}.nii.gz") for t in (0, 1, 3)]
    mask = os.path.join(cohort, "mask", "T-006_spy2_vis1_mask.nii.gz")
    study = ["--pre", files[0], "--early", files[1], "--late", files[2], "--mask", mask]
    # a BreastDCEDL file read with its placeholder header would give slices of the wrong axis
    assert predict.main(["--workdir", setup["run_a"], *study, "--layout", "standard"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert files[0] in line and "wrong axis" in line and "--layout breastdcedl" in line
    # a copy of the run whose dataset cannot be read: no record decides an identity affine
    orphan = tmp_path / "orphan_run"
    shutil.copytree(setup["run_a"], orphan)
    config = json.loads((orphan / "config.json").read_text())
    config["data_dir"] = str(tmp_path / "moved_away")
    (orphan / "config.json").write_text(json.dumps(config))
    assert predict.main(["--workdir", str(orphan), *study]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "orientation is ambiguous" in line and files[0] in line
    assert "--layout breastdcedl" in line and "--layout standard" in line
    # with no record, a file with a real orientation is read with its own geometry
    oriented = str(tmp_path / "oriented.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.diag([0.7, 0.7, 2.5, 1])),
             oriented)
    restored = types.SimpleNamespace(workdir=str(orphan),
                                     config=types.SimpleNamespace(data_dir=config["data_dir"]))
    assert prediction.choose_layout(restored, oriented, None) == ("standard", "file")
    assert prediction.choose_layout(restored, files[0], "breastdcedl") == ("breastdcedl", "flag")


def test_predict_reports_bad_input_by_file(setup, tmp_path, capsys):
    cohort = setup["cohort"]
    pre = os.path.join(cohort, "dce", "T-006_spy2_vis1_dce_aqc_0.nii.gz")
    code = predict.main(["--workdir", setup["run_a"], "--pre", pre, "--early", pre,
                         "--late", str(tmp_path / "missing.nii.gz"), "--box", "1,2,3,4,5,6"])
    line = one_error_line(capsys.readouterr().err)
    # the patient is named after the --pre file's BreastDCEDL patient
    assert code == 1 and "missing.nii.gz" in line and line.startswith("error: patient T-006:")
    assert predict.file_stem("x/ISPY1_1001_spy1_vis1_acq2.nii.gz") == "ISPY1_1001"
    assert predict.file_stem("x/Breast_MRI_014_duke_aqc_1.nii.gz") == "Breast_MRI_014"
    assert predict.file_stem("x/T-006_pre.nii.gz") == "T-006_pre"
    # files read with their own geometry that look like BreastDCEDL's are pointed out
    assert "--layout breastdcedl" in predict.layout_warning(pre, "standard")
    assert predict.layout_warning(pre, "breastdcedl") is None
    oriented = str(tmp_path / "oriented.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.diag([0.7, 0.7, 2.5, 1])),
             oriented)
    assert predict.layout_warning(oriented, "standard") is None
    with pytest.raises(SystemExit):
        predict.parse_args(["--workdir", "r", "--pre", "a", "--early", "b", "--late", "c",
                            "--box", "1,2,3"])
    with pytest.raises(SystemExit):
        predict.parse_args(["--workdir", "r", "--pre", "a", "--early", "b", "--late", "c",
                            "--box", "6,3,13,14,7,9"])
    assert "each first index <= the second" in capsys.readouterr().err


def test_compare_runs_a_paired_delong_test(setup, tmp_path, capsys):
    assert compare.main([setup["run_a"], setup["run_b"], "--out",
                         str(tmp_path / "c.json")]) == 0
    result = strict_json(tmp_path / "c.json")
    a = comparison.read_predictions(setup["run_a"], "test")
    b = comparison.read_predictions(setup["run_b"], "test")
    ids = sorted(a)
    expected = stats.delong_paired_test([a[i][0] for i in ids], [a[i][1] for i in ids],
                                        [b[i][1] for i in ids])
    assert (np.nan if result["p_value"] is None else result["p_value"]) == pytest.approx(
        expected["p_value"], nan_ok=True)
    assert result["difference"] == pytest.approx(expected["auc_a"] - expected["auc_b"])
    assert "paired DeLong" in capsys.readouterr().out
    with pytest.raises(ValueError, match="different patients"):
        comparison.compare(a, {k: v for k, v in b.items() if k != ids[0]})


def test_summary_breaks_down_by_cohort_and_slice_ci_resamples_patients():
    rng = np.random.default_rng(0)
    patients = [f"P{i:02d}" for i in range(30)]
    label_of = {p: int(i % 3 == 0) for i, p in enumerate(patients)}
    cohort_of = {p: ("site_a" if i < 18 else "site_b") for i, p in enumerate(patients)}
    ids = np.array([p for p in patients for _ in range(4)], dtype=object)
    labels = np.array([label_of[p] for p in ids])
    slices = {"patient_id": ids, "cohort": np.array([cohort_of[p] for p in ids], dtype=object),
              "slice_index": np.tile(np.arange(4), 30), "label": labels,
              # slices of one patient are alike: a patient effect plus a little slice noise
              "probability": np.clip(0.3 * labels + np.repeat(rng.uniform(0, 0.6, 30), 4)
                                     + rng.uniform(0, 0.1, ids.size), 0, 1)}
    result = evaluation.summarize(slices, aggregation="median", threshold=0.5, samples=200)
    table = evaluation.patient_table(slices, "median")
    for cohort in ("site_a", "site_b"):
        chosen = table["cohort"] == cohort
        entry = result["cohorts"][cohort]
        assert entry["patients"] == chosen.sum()
        assert entry["auc"] == pytest.approx(skm.roc_auc_score(table["label"][chosen],
                                                               table["probability"][chosen]))
    low, high = result["slice"]["auc_ci_low"], result["slice"]["auc_ci_high"]
    assert low < result["slice"]["auc"] < high
    # resampling whole patients: wider than an interval that treats the 120 correlated slices
    # as independent patients
    independent = dict(slices, patient_id=np.array([f"S{i}" for i in range(ids.size)],
                                                   dtype=object))
    i_low, i_high = evaluation.slice_auc_ci(independent, samples=500, level=0.95, seed=0)
    assert (high - low) > (i_high - i_low)
    single = dict(slices, cohort=np.array(["one"] * ids.size, dtype=object))
    assert "cohorts" not in evaluation.summarize(single, aggregation="median", threshold=0.5,
                                                 samples=50)


def test_a_run_without_a_best_checkpoint_falls_back_to_the_latest(setup, tmp_path):
    import shutil

    workdir = str(tmp_path / "run")
    shutil.copytree(setup["run_a"], workdir)
    shutil.rmtree(os.path.join(workdir, "best"))
    os.makedirs(os.path.join(workdir, "best"))
    shutil.rmtree(os.path.join(workdir, "eval"))
    restored = RunFolder(workdir).restore("best")
    assert restored.checkpoint.startswith("latest") and restored.step == 6
    result = evaluation.evaluate_run(workdir, samples=50, progress=False)
    assert result["step"] == 6 and "no best" in result["checkpoint"]


def test_another_checkpoint_is_written_beside_the_best_ones_results(setup, capsys):
    run = setup["run_a"]
    best = open(os.path.join(run, "eval", "test", "metrics.json")).read()
    assert evaluate.main(["--workdir", run, "--checkpoint", "latest", "--quiet",
                          "--bootstrap", "20"]) == 0
    assert capsys.readouterr().out.strip().endswith(os.path.join("eval", "test_latest"))
    latest = json.load(open(os.path.join(run, "eval", "test_latest", "metrics.json")))
    assert latest["checkpoint"].startswith("latest")
    assert open(os.path.join(run, "eval", "test", "metrics.json")).read() == best
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--workdir", run, "--checkpoint", "abc"])
    assert "best, latest or a step number, got 'abc'" in capsys.readouterr().err
