"""The SLURM backend on a real one-node cluster (`slurm_cluster.Cluster`): the scripts the launcher
writes are submitted with sbatch and run by slurmd, never only compared as text.

Paths hold a space and an apostrophe, so any command string that the shell splits again (the
bug where `--workdir` received `'...'` with its quotes, and every run landed in a folder named
`'`) fails here."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

import slurm_cluster
from conftest import write_cohort
from launch import collect, sweep
from test_evaluate import SPLITS
from test_sweep import TINY_SWEEP

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["batch_size=4", "warmup_steps=1", "eval.batch_size=4", "log_every_steps=1"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = slurm_cluster.unavailable()
    if reason:
        slurm_cluster.skip_or_fail(reason)
    started = slurm_cluster.Cluster(str(tmp_path_factory.mktemp("slurm")))
    try:
        started.start()
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm_cohort")
    folder = str(root / "a cohort")
    write_cohort(folder, patients=18, splits=SPLITS)
    (root / "tiny.py").write_text(TINY_SWEEP)
    (root / "one.py").write_text(TINY_SWEEP.replace('["none", "dual"]', '["dual"]'))
    return folder, str(root / "tiny.py")


def launch(cluster, monkeypatch, capsys, args) -> dict[str, str]:
    """Runs `launch.sweep --backend slurm` against the cluster; {'prepare': id, 'runs': id}."""
    monkeypatch.setenv("SLURM_CONF", cluster.conf)
    assert sweep.main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    jobs = {}
    prepared = re.search(r"submitted preparation: job (\d+)", out)
    if prepared:
        jobs["prepare"] = prepared.group(1)
    jobs["runs"] = re.search(r"array job (\d+)", out).group(1)
    return jobs


def outputs(sweep_dir: str, tail: int = 3000) -> str:
    """The jobs' output files (their last `tail` characters each; 0: whole)."""
    folder = os.path.join(sweep_dir, "slurm")
    return "\n".join(f"---- {name}\n{open(os.path.join(folder, name)).read()[-tail:]}"
                     for name in sorted(os.listdir(folder)) if name.endswith(".out"))


def slurm_args(sweep_file: str, cohort: str, sweep_dir: str, *extra: str) -> list[str]:
    python = os.path.relpath(sys.executable, REPO)       # relative: the job starts in --repo
    return ["--sweep", sweep_file, "--backend", "slurm", "--source", cohort,
            "--sweep_dir", sweep_dir, "--partition", "debug", "--gpus_per_task", "0",
            "--cpus_per_task", "1", "--python", python, "--repo", REPO,
            *[item for setting in TINY for item in ("--set", setting)], *extra]


def git_status() -> str:
    return subprocess.run(["git", "status", "--porcelain"], cwd=REPO, stdout=subprocess.PIPE,
                          text=True, check=True).stdout


def test_a_two_run_sweep_on_slurm_trains_evaluates_and_collects(cluster, cohort, tmp_path,
                                                                 monkeypatch, capsys):
    folder, sweep_file = cohort
    sweep_dir = str(tmp_path / "sweep dir's")
    before = git_status()
    steps = ["total_steps=3", "eval.every_steps=3", "checkpoint.every_steps=3"]
    args = slurm_args(sweep_file, folder, sweep_dir,
                      *[item for setting in steps for item in ("--set", setting)])
    jobs = launch(cluster, monkeypatch, capsys, args)
    assert set(jobs) == {"prepare", "runs"}
    # the array waits for the preparation
    assert cluster.job(f"{jobs['runs']}_0")["Dependency"] in (f"afterok:{jobs['prepare']}(unfulfilled)",
                                                             "(null)")
    cluster.wait(list(jobs.values()))
    for task in (f"{jobs['runs']}_0", f"{jobs['runs']}_1"):
        record = cluster.job(task)
        assert record["JobState"] == "COMPLETED", f"{task}: {record}\n{outputs(sweep_dir)}"

    result = collect.collect(sweep_dir)
    assert len(result["rows"]) == 2 and not result["missing"], outputs(sweep_dir)
    manifest = json.load(open(os.path.join(sweep_dir, "manifest.json")))
    for run in manifest["runs"]:
        assert run["workdir"].startswith(sweep_dir)
        config = json.load(open(os.path.join(run["workdir"], "config.json")))
        # each task ran its own command: the run's own setting, in the run's own folder
        assert config["model"]["kwargs"]["attention"] == run["overrides"][
            "model.kwargs.attention"]
        metrics = json.load(open(os.path.join(run["workdir"], "eval", "test", "metrics.json")))
        row = next(r for r in result["rows"] if r["configuration"] == run["group"])
        assert row["test_auc_mean"] == pytest.approx(metrics["patient"]["auc"], nan_ok=True)
    # nothing was written inside the repository (the quoting bug made a folder named ')
    assert git_status() == before
    assert not os.path.exists(os.path.join(REPO, "'"))

    # a relaunch finds both finished and submits nothing
    monkeypatch.setenv("SLURM_CONF", cluster.conf)
    assert sweep.main(args) == 0
    assert "all 2 runs are finished: nothing to submit" in capsys.readouterr().out


def test_a_task_cancelled_with_sigterm_resumes_when_the_sweep_is_relaunched(
        cluster, cohort, tmp_path, monkeypatch, capsys):
    folder, sweep_file = cohort
    sweep_dir = str(tmp_path / "sweep dir's")
    total = 60
    steps = [f"total_steps={total}", f"eval.every_steps={total}",
             f"checkpoint.every_steps={total}"]
    one_run = sweep_file.replace("tiny.py", "one.py")
    args = slurm_args(one_run, folder, sweep_dir,
                      *[item for setting in steps for item in ("--set", setting)])
    jobs = launch(cluster, monkeypatch, capsys, args)
    task = f"{jobs['runs']}_0"
    (entry,) = json.load(open(os.path.join(sweep_dir, "manifest.json")))["runs"]
    log = os.path.join(entry["workdir"], "metrics.jsonl")
    deadline = time.monotonic() + 300
    while not (os.path.exists(log) and len(open(log).readlines()) >= 2):
        assert time.monotonic() < deadline, outputs(sweep_dir)
        assert cluster.job(task)["JobState"] in ("PENDING", "RUNNING"), outputs(sweep_dir)
        time.sleep(0.5)
    # training is under way (its SIGTERM handler set): stop it as a preemption would
    cluster.command(["scancel", "--signal=TERM", task])
    cluster.wait([jobs["runs"]])
    record = cluster.job(task)
    assert record["ExitCode"] == "143:0", f"{record}\n{outputs(sweep_dir)}"
    assert not sweep.is_finished(entry["workdir"])
    stopped_at = json.loads(open(log).readlines()[-1])["step"]
    assert 0 < stopped_at < total

    again = launch(cluster, monkeypatch, capsys, args)
    assert "prepare" not in again                      # the data is there: no preparation job
    cluster.wait([again["runs"]])
    assert cluster.job(f"{again['runs']}_0")["JobState"] == "COMPLETED", outputs(sweep_dir)
    assert sweep.is_finished(entry["workdir"])
    resumed = re.findall(r"resumed from step (\d+)", outputs(sweep_dir, tail=0))
    assert len(resumed) == 1 and 0 < int(resumed[0]) < total, outputs(sweep_dir)
