"""`python -m her2jax.demo` at a tiny size: every step runs, the report and its pictures are
written, the table has one row per model and normalisation with the runs' own figures, and a
rerun reuses every cached step."""
from __future__ import annotations

import csv
import json
import os
import re

import pytest
from PIL import Image

from conftest import strict_json
from her2jax import demo
from her2jax.run_folder import RunFolder

TINY = ["--patients", "24", "--volume_size", "48", "--image_size", "16", "--steps", "3",
        "--batch_size", "8", "--bootstrap", "50", "--explain_patients", "2", "--quiet",
        "--workers", "1"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo") / "demo_out")
    assert demo.main(["--out", out, *TINY]) == 0
    return out


def test_report_table_and_pictures(first_run, capsys):
    out = first_run
    report = open(os.path.join(out, "report.md")).read()
    rows = [line for line in report.splitlines()
            if any(line.startswith(f"| {model} | ") for model in demo.MODELS)]
    assert len(rows) == len(demo.NORMALIZATIONS) * len(demo.MODELS)
    assert {tuple(cell.strip() for cell in row.split("|")[1:3]) for row in rows} == \
        {(model, n) for model in demo.MODELS for n in demo.NORMALIZATIONS}
    # each row quotes the AUC that run's evaluation wrote
    for name in os.listdir(os.path.join(out, "runs")):
        metrics = json.load(open(os.path.join(out, "runs", name, "eval", "test", "metrics.json")))
        assert f"{metrics['patient']['auc']:.3f}" in report, name
    for picture in re.findall(r"\]\(([^)]+\.png)\)", report):
        with Image.open(os.path.join(out, picture)) as image:
            assert image.size[0] > 100 and image.size[1] > 100, picture
    assert "roc_all.png" in report and "qc_global_minmax.png" in report
    assert len([p for p in report.split() if "gradcam/" in p]) == 2
    # the showcased patients follow the stated rule, and the heat figures are reported
    predictions = list(csv.DictReader(open(os.path.join(
        out, "runs", f"resnet18_{demo.NORMALIZATIONS[0]}", "eval", "test", "predictions.csv"))))
    heat = strict_json(os.path.join(out, "gradcam", "heat.json"))
    correct = {row["patient_id"] for row in predictions if row["decision"] == row["label"]}
    assert set(heat["showcased"]) <= (correct or {row["patient_id"] for row in predictions})
    assert f"({', '.join(heat['showcased'])}; HER2+ and HER2- alternately" in report
    for name, scopes in heat["maps"].items():
        assert scopes["all"]["slices"] >= scopes["showcased"]["slices"] > 0, name
        assert f"| {name} | " in report


def test_rerun_reuses_every_step(first_run, capsys):
    capsys.readouterr()
    assert demo.main(["--out", first_run, *TINY]) == 0
    err = capsys.readouterr().err
    assert err.count("cached, reused") == 1 + len(demo.NORMALIZATIONS) * (1 + 2 * len(demo.MODELS)) + 1


def test_a_run_trained_further_is_evaluated_and_explained_again(first_run, capsys):
    """--steps 3 then --steps 5: the runs resume, and their evaluation and Grad-CAM follow the
    checkpoints the runs have now; --bootstrap alone redoes only the evaluations."""
    capsys.readouterr()
    longer = [a if a != "3" else "5" for a in TINY]
    assert longer[longer.index("--steps") + 1] == "5"
    assert demo.main(["--out", first_run, *longer]) == 0
    err = capsys.readouterr().err
    # every run trained further (an evaluation is reused only where the best step stayed)
    assert not re.search(r"\] train .*\n    cached", err)
    for name in os.listdir(os.path.join(first_run, "runs")):
        workdir = os.path.join(first_run, "runs", name)
        metrics = json.load(open(os.path.join(workdir, "eval", "test", "metrics.json")))
        assert metrics["step"] == RunFolder(workdir).default_step(), name
        assert os.path.isdir(os.path.join(workdir, "checkpoints", "5")), name
    explained = json.load(open(os.path.join(first_run, "gradcam", "explain.json")))
    resnet = demo.epath.Path(first_run) / "runs" / f"resnet18_{demo.NORMALIZATIONS[0]}"
    assert explained["step"] == RunFolder(resnet).default_step()

    more = list(longer)
    more[more.index("--bootstrap") + 1] = "60"
    assert demo.main(["--out", first_run, *more]) == 0
    err = capsys.readouterr().err
    runs = len(demo.NORMALIZATIONS) * len(demo.MODELS)
    assert err.count("cached, reused") == 1 + len(demo.NORMALIZATIONS) + runs + 1
    for name in os.listdir(os.path.join(first_run, "runs")):
        metrics = json.load(open(os.path.join(first_run, "runs", name, "eval", "test",
                                              "metrics.json")))
        assert metrics["bootstrap_samples"] == 60


def test_a_cached_result_is_for_the_current_checkpoint_and_settings(tmp_path):
    workdir = demo.epath.Path(tmp_path)
    path = workdir / "metrics.json"
    assert demo.cached(path, workdir) is None
    (workdir / "checkpoints" / "3").mkdir(parents=True)
    path.write_text(json.dumps({"step": 3, "bootstrap_samples": 50}))
    assert RunFolder(workdir).default_step() == 3
    assert demo.cached(path, workdir, bootstrap_samples=50) == {"step": 3, "bootstrap_samples": 50}
    assert demo.cached(path, workdir, bootstrap_samples=60) is None
    (workdir / "checkpoints" / "5").mkdir()          # trained further, no best checkpoint
    assert demo.cached(path, workdir, bootstrap_samples=50) is None
    (workdir / "best" / "3").mkdir(parents=True)     # the best one is still step 3
    (workdir / "best" / "4.orbax-checkpoint-tmp-1").mkdir()
    assert RunFolder(workdir).default_step() == 3
    assert demo.cached(path, workdir, bootstrap_samples=50) is not None


def test_other_training_settings_in_the_same_out_are_refused_in_one_line(first_run, capsys):
    capsys.readouterr()
    assert "--seed" not in TINY                     # the first run used the default, 0
    other = [*TINY, "--seed", "7"]
    config = os.path.join(first_run, "runs", f"resnet18_{demo.NORMALIZATIONS[0]}", "config.json")
    before = open(config).read()
    assert demo.main(["--out", first_run, *other]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "seed 0 -> 7" in err and "use another --out" in err
    assert open(config).read() == before
