"""`python -m her2jax.explain` on a tiny run trained on a planted signal (only HER2-positive
tumours enhance): overlays are written, the heat maps are not constant, and Grad-CAM of the
positive logit sits on the tumour more than around it."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from configs import resnet
from conftest import strict_json, write_cohort
from her2jax import explain
from her2jax.analysis import explanation, prediction
from her2jax.training import loop as train
from test_evaluate import SPLITS, run_prepare


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    cohort = str(root / "cohort")
    write_cohort(cohort, patients=18, splits=SPLITS, planted=True)
    # the tumour fills the middle third of a 96 px crop: the middle cell of layer4's 3 x 3 grid
    data_dir = run_prepare("--source", cohort, "--data_dir", str(root / "prepared"),
                           "--image_size", "96", "--crop_margin", "1.0")
    config = resnet.get_config("resnet18,runlocal")
    config.data_dir = data_dir
    config.batch_size = 8
    config.total_steps = 30
    config.warmup_steps = 3
    config.eval.every_steps = 30
    config.checkpoint.every_steps = 30
    config.log_every_steps = 10
    workdir = str(root / "run")
    train.train_and_evaluate(config, workdir)
    return cohort, workdir


def test_overlays_and_grad_cam_on_the_tumour(trained, capsys):
    cohort, workdir = trained
    out = os.path.join(workdir, "explain_out")
    assert explain.main(["--workdir", workdir, "--split", "test", "--patients", "3",
                         "--out", out]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in printed[:3]] == [
        "Grad-CAM", "Grad-CAM layer3", "gate attention.spatial"]
    assert all("mean heat inside / outside the tumour" in line for line in printed[:3])
    assert printed[3].startswith("12 overlays of 3 patients in ")
    summary = strict_json(os.path.join(out, "explain.json"))
    assert summary["patients"] == ["T-000", "T-001", "T-006"]     # +, -, + alternately
    assert len(summary["slices"]) == 12                           # 4 slices each
    for entry in summary["slices"]:
        with Image.open(os.path.join(out, entry["file"])) as image:
            pixels = np.asarray(image.convert("RGB"))
        # slice, Grad-CAM (layer4 is 3 x 3 at 96 px, so layer3 too), the spatial gate
        assert pixels.shape[1] >= 4 * pixels.shape[0] * 0.8 and pixels.std() > 10
        assert set(entry["maps"]) == {"Grad-CAM", "Grad-CAM layer3", "gate attention.spatial"}
    positive = [e for e in summary["slices"] if e["label"] == 1]
    assert min(e["probability"] for e in positive) > max(
        e["probability"] for e in summary["slices"] if e["label"] == 0), "did not learn"
    ratios = [e["maps"]["Grad-CAM"]["concentration_ratio"] for e in positive]
    inside = [e["maps"]["Grad-CAM"]["inside_fraction"] for e in positive]
    area = [e["maps"]["Grad-CAM"]["mask_fraction"] for e in positive]
    # layer4 is 3 x 3 here and its receptive fields span the image: the map is broad, and yet
    # every positive slice has more heat per pixel on the tumour than around it
    assert min(ratios) > 1.0 and np.mean(ratios) > 1.05, ratios
    assert np.mean(inside) > np.mean(area), (inside, area)
    finer = [e["maps"]["Grad-CAM layer3"]["concentration_ratio"] for e in positive]
    assert np.mean(finer) > 1.0, finer
    assert explanation.finer_layer(32) == 2 and explanation.finer_layer(64) == 3
    assert explanation.finer_layer(128) is None and explanation.finer_layer(8) is None


def test_predict_with_explain_writes_overlays(trained, tmp_path):
    cohort, workdir = trained
    files = [os.path.join(cohort, "dce", f"T-000_spy2_vis1_dce_aqc_{t}.nii.gz") for t in (0, 1, 3)]
    result = prediction.predict(workdir, pre=files[0], early=files[1], late=files[2],
                                mask=os.path.join(cohort, "mask", "T-000_spy2_vis1_mask.nii.gz"),
                                layout="breastdcedl", patient_id="T-000", out=str(tmp_path),
                                explain=True)
    assert len(result["explanations"]) == len(result["slices"]) == 4
    for entry in result["explanations"]:
        assert (tmp_path / entry["file"]).stat().st_size > 1000
        assert entry["maps"]["Grad-CAM"]["concentration_ratio"] > 1


def test_summary_names_every_map_even_without_a_ratio(monkeypatch, capsys):
    """A 1x1 layer4 map (small images) has no inside / outside ratio: still one line for it."""
    summary = {"slices": [{"maps": {"Grad-CAM": {}, "Grad-CAM layer3": {}}}],
               "mean_concentration_ratio": {"Grad-CAM layer3": 1.5}, "patients": ["P1"],
               "folder": "out"}
    monkeypatch.setattr(explain, "explain_run", lambda *args, **kwargs: summary)
    assert explain.main(["--workdir", "run"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "Grad-CAM: inside / outside ratio defined on no slice (a map that is zero or constant, "
        "e.g. a 1x1 feature map at this image size)",
        "Grad-CAM layer3: mean heat inside / outside the tumour 1.50",
        "1 overlay of 1 patient in out"]
