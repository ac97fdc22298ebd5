"""`python -m her2jax.demo` at a tiny size: every step runs, the report and its pictures are
written, the table has one row per model and normalisation with the runs' own figures, and a
rerun reuses every cached step."""
from __future__ import annotations

import json
import os
import re

import pytest
from PIL import Image

from her2jax import demo

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


def test_rerun_reuses_every_step(first_run, capsys):
    capsys.readouterr()
    assert demo.main(["--out", first_run, *TINY]) == 0
    err = capsys.readouterr().err
    assert err.count("cached, reused") == 1 + len(demo.NORMALIZATIONS) * (1 + 2 * len(demo.MODELS)) + 1
