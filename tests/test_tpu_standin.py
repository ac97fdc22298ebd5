"""The Cloud TPU backend executed, not only printed: `launch.sweep --backend tpu` runs its gcloud
commands against the stand-in `gcloud` (tests/standin/gcloud), which runs every worker of a
two-host "pod slice" as its own local process with the multi-host environment. The data is
prepared on worker 0; two seeds of one configuration are trained as one pack (`--pack 2`) by
two JAX processes (gloo), evaluated on both, and collected run by run.

The cohort path holds a space and the sweep folder an apostrophe: the commands nest quoting
(`--command='...'` for the worker's shell inside the launcher's), and any slip fails here."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

from conftest import write_cohort
from launch import collect, sweep
from test_evaluate import SPLITS
from test_sweep import TINY_SWEEP

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STANDIN = os.path.join(REPO, "tests", "standin")
TINY = ["batch_size=4", "total_steps=3", "warmup_steps=1", "eval.every_steps=3",
        "eval.batch_size=4", "checkpoint.every_steps=3", "log_every_steps=1"]


def test_a_sweep_runs_on_a_two_worker_tpu_stand_in(tmp_path, monkeypatch, capfd):
    root = tmp_path / "gcloud"
    monkeypatch.setenv("GCLOUD_STANDIN_ROOT", str(root))
    monkeypatch.setenv("GCLOUD_STANDIN_PYTHON", sys.executable)
    monkeypatch.setenv("PATH", STANDIN + os.pathsep + os.environ["PATH"])
    cohort = str(tmp_path / "a cohort")
    write_cohort(cohort, patients=18, splits=SPLITS)
    sweep_file = tmp_path / "one.py"
    sweep_file.write_text(TINY_SWEEP.replace('["none", "dual"]', '["dual"]')
                          .replace("seeds(1)", "seeds(2)"))
    args = ["--sweep", str(sweep_file), "--backend", "tpu", "--source", cohort,
            "--sweep_dir", "gs://her2jax-test/sweep dir's", "--tpu_name", "h2",
            "--accelerator", "v4-16", "--queued", "--delete", "--repo", REPO, "--pack", "2",
            *[item for setting in TINY for item in ("--set", setting)]]
    code = sweep.main(args)
    output = capfd.readouterr()
    assert code == 0, output.err[-5000:]

    bucket = root / "buckets" / "her2jax-test" / "sweep dir's"
    entries = json.loads((bucket / "manifest.json").read_text())["runs"]
    assert [(e["status"], e["seed"]) for e in entries] == [("finished", 0), ("finished", 1)]
    # both workers trained both runs together: one pack, one two-process JAX job
    assert "data parallel over 2 devices in 2 processes" in output.err
    assert "2 runs in one step" in output.err
    assert output.err.count("tpu-vm ssh h2 --zone=us-central2-b --worker=all --command='cd "
                            "her2jax && .venv/bin/python -m her2jax.main") == 1
    result = collect.collect(str(bucket))
    assert len(result["rows"]) == 1 and result["rows"][0]["seeds"] == 2
    assert not result["missing"]
    aucs = []
    for entry in entries:
        workdir = bucket / "runs" / entry["name"]
        config = json.loads((workdir / "config.json").read_text())
        assert config["model"]["kwargs"]["attention"] == "dual"
        assert config["seed"] == entry["seed"] and config["input"]["source"] == "device"
        assert config["data_dir"].startswith("gs://her2jax-test/sweep dir's/data/her2_dce/") or \
            config["data_dir"].startswith(str(bucket / "data" / "her2_dce"))
        metrics = json.loads((workdir / "eval" / "test" / "metrics.json").read_text())
        aucs.append(metrics["patient"]["auc"])
    assert result["rows"][0]["test_auc_mean"] == pytest.approx(float(np.mean(aucs)),
                                                               nan_ok=True)
    assert not (root / "tpus" / "h2").exists()             # --delete removed the VM
