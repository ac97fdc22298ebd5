"""The SLURM backend on a real one-node cluster (`slurm_cluster.Cluster`): the scripts the launcher
writes are submitted with sbatch and run by slurmd, never only compared as text.

One two-run sweep is launched as a user would (preparation job, then the array job that depends
on it); one of its tasks is cancelled with `scancel --signal=TERM` in mid-training; the same
command launched again resubmits only that task, which resumes from its checkpoint; `collect`
then lists both runs. Paths hold a space and an apostrophe, so any command string that the shell
splits again (the bug where `--workdir` received `'...'` with its quotes, and every run landed
in a folder named `'`) fails here."""
from __future__ import annotations

import contextlib
import io
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
TOTAL_STEPS = 80        # ~10 steps a second here: the cancelled task is stopped well before its end
TINY = ["batch_size=4", "warmup_steps=1", "eval.batch_size=4", "log_every_steps=1",
        f"total_steps={TOTAL_STEPS}", f"eval.every_steps={TOTAL_STEPS}",
        f"checkpoint.every_steps={TOTAL_STEPS}"]
CANCELLED = 1           # the array task stopped in mid-training


def git_status() -> str:
    return subprocess.run(["git", "status", "--porcelain"], cwd=REPO, stdout=subprocess.PIPE,
                          text=True, check=True).stdout


def outputs(sweep_dir: str, tail: int = 3000) -> str:
    """The jobs' output files (the last `tail` characters of each; 0: whole)."""
    folder = os.path.join(sweep_dir, "slurm")
    return "\n".join(f"---- {name}\n{open(os.path.join(folder, name)).read()[-tail:]}"
                     for name in sorted(os.listdir(folder)) if name.endswith(".out"))


def launch(cluster, args: list[str]) -> tuple[dict[str, str], str]:
    """`launch.sweep --backend slurm` against the cluster: ({'prepare': id, 'runs': id}, what it
    printed)."""
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setenv("SLURM_CONF", cluster.conf)
        assert sweep.main(args) == 0
    out = printed.getvalue()
    jobs = {}
    for key, pattern in (("prepare", r"submitted preparation: job (\d+)"),
                         ("runs", r"array job (\d+)")):
        found = re.search(pattern, out)
        if found:
            jobs[key] = found.group(1)
    return jobs, out


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
def slurm_sweep(cluster, tmp_path_factory):
    """The sweep launched, one task cancelled and resumed by a relaunch; what each step saw."""
    root = tmp_path_factory.mktemp("slurm_sweep")
    cohort = str(root / "a cohort")
    write_cohort(cohort, patients=18, splits=SPLITS)
    (root / "tiny.py").write_text(TINY_SWEEP)
    sweep_dir = str(root / "sweep dir's")
    python = os.path.relpath(sys.executable, REPO)       # relative: the job starts in --repo
    args = ["--sweep", str(root / "tiny.py"), "--backend", "slurm", "--source", cohort,
            "--sweep_dir", sweep_dir, "--partition", "debug", "--gpus_per_task", "0",
            "--cpus_per_task", "1", "--python", python, "--repo", REPO,
            *[item for setting in TINY for item in ("--set", setting)]]
    status = git_status()
    first, _ = launch(cluster, args)
    manifest = json.load(open(os.path.join(sweep_dir, "manifest.json")))
    log = os.path.join(manifest["runs"][CANCELLED]["workdir"], "metrics.jsonl")
    task = f"{first['runs']}_{CANCELLED}"
    deadline = time.monotonic() + 300
    while not (os.path.exists(log) and len(open(log).readlines()) >= 2):
        assert time.monotonic() < deadline, outputs(sweep_dir)
        assert cluster.job(task)["JobState"] in ("PENDING", "RUNNING"), outputs(sweep_dir)
        time.sleep(0.5)
    # training is under way (its SIGTERM handler set): stop it as a preemption would
    cluster.command(["scancel", "--signal=TERM", task])
    cluster.wait(list(first.values()))
    records = {key: cluster.job(job) for key, job in (
        ("prepare", first["prepare"]), ("kept", f"{first['runs']}_{1 - CANCELLED}"),
        ("cancelled", task))}
    stopped_at = json.loads(open(log).readlines()[-1])["step"]
    finished_after_cancel = [sweep.is_finished(run["workdir"]) for run in manifest["runs"]]
    second, _ = launch(cluster, args)
    script = open(os.path.join(sweep_dir, "slurm", "runs.sbatch")).read()
    cluster.wait(list(second.values()))
    records["resumed"] = cluster.job(f"{second['runs']}_{CANCELLED}")
    third, printed_third = launch(cluster, args)
    return dict(sweep_dir=sweep_dir, manifest=manifest, first=first, second=second,
                third=third, records=records, stopped_at=stopped_at, script=script,
                finished_after_cancel=finished_after_cancel, printed_third=printed_third, status_before=status, status_after=git_status())


def test_a_two_run_sweep_on_slurm_trains_evaluates_and_collects(slurm_sweep):
    sweep_dir, records = slurm_sweep["sweep_dir"], slurm_sweep["records"]
    assert set(slurm_sweep["first"]) == {"prepare", "runs"}
    assert records["prepare"]["JobState"] == "COMPLETED", outputs(sweep_dir)
    assert records["kept"]["JobState"] == "COMPLETED", outputs(sweep_dir)
    # the array waited for the preparation (ISO times: text order is time order)
    assert records["kept"]["StartTime"] >= records["prepare"]["EndTime"]

    result = collect.collect(sweep_dir)
    assert len(result["rows"]) == 2 and not result["missing"], outputs(sweep_dir)
    for run in slurm_sweep["manifest"]["runs"]:
        assert run["workdir"].startswith(sweep_dir)
        config = json.load(open(os.path.join(run["workdir"], "config.json")))
        # each task ran its own command: the run's own setting, in the run's own folder
        assert config["model"]["kwargs"]["attention"] == run["overrides"][
            "model.kwargs.attention"]
        metrics = json.load(open(os.path.join(run["workdir"], "eval", "test", "metrics.json")))
        row = next(r for r in result["rows"] if r["configuration"] == run["group"])
        assert row["test_auc_mean"] == pytest.approx(metrics["patient"]["auc"], nan_ok=True)
    # nothing was written inside the repository (the quoting bug made a folder named ')
    assert slurm_sweep["status_after"] == slurm_sweep["status_before"]
    assert not os.path.exists(os.path.join(REPO, "'"))
    # once both are finished, a relaunch submits nothing
    assert not slurm_sweep["third"]
    assert "all 2 runs are finished: nothing to submit" in slurm_sweep["printed_third"]


def test_a_task_cancelled_with_sigterm_resumes_when_the_sweep_is_relaunched(slurm_sweep):
    sweep_dir, records = slurm_sweep["sweep_dir"], slurm_sweep["records"]
    assert records["cancelled"]["ExitCode"] == "143:0", outputs(sweep_dir)
    assert slurm_sweep["finished_after_cancel"] == [i != CANCELLED for i in range(2)]
    assert 0 < slurm_sweep["stopped_at"] < TOTAL_STEPS
    # the relaunch: no preparation (the data is there), the cancelled task alone
    assert set(slurm_sweep["second"]) == {"runs"}
    assert f"#SBATCH --array={CANCELLED}\n" in slurm_sweep["script"]
    assert records["resumed"]["JobState"] == "COMPLETED", outputs(sweep_dir)
    resumed = re.findall(r"resumed from step (\d+)", outputs(sweep_dir, tail=0))
    assert resumed == [str(slurm_sweep["stopped_at"])], outputs(sweep_dir)


def test_a_packed_sweep_is_one_array_task_per_pack(cluster, tmp_path):
    """`--pack 2` on SLURM: two seeds of one configuration are one array task, trained by one
    process as one pack, evaluated together, and collected as two runs. Submitting the sweep
    again while its jobs are queued is refused."""
    cohort = str(tmp_path / "cohort")
    write_cohort(cohort, patients=18, splits=SPLITS)
    (tmp_path / "seeds.py").write_text(TINY_SWEEP.replace('["none", "dual"]', '["dual"]')
                                       .replace("seeds(1)", "seeds(2)"))
    sweep_dir = str(tmp_path / "packed sweep")
    settings = ["batch_size=4", "warmup_steps=1", "eval.batch_size=4", "total_steps=3",
                "eval.every_steps=3", "checkpoint.every_steps=3"]
    args = ["--sweep", str(tmp_path / "seeds.py"), "--backend", "slurm", "--source", cohort,
            "--sweep_dir", sweep_dir, "--partition", "debug", "--cpus_per_task", "1",
            "--python", os.path.relpath(sys.executable, REPO), "--repo", REPO, "--pack", "2",
            *[item for setting in settings for item in ("--set", setting)]]
    jobs, _ = launch(cluster, args)
    # submitted again while those jobs are queued, the runs would run twice: refused
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(printed):
        patch.setenv("SLURM_CONF", cluster.conf)
        assert sweep.main(args) == 1
    error = printed.getvalue().strip().splitlines()[-1]
    assert error.startswith(f"error: {sweep_dir}: SLURM job ") and jobs["runs"] in error
    assert "of this sweep is still queued or running" in error
    cluster.wait(list(jobs.values()))
    script = open(os.path.join(sweep_dir, "slurm", "runs.sbatch")).read()
    assert "#SBATCH --array=0\n" in script and "--member=" in script
    assert cluster.job(f"{jobs['runs']}_0")["JobState"] == "COMPLETED", outputs(sweep_dir)
    assert "2 runs in one step" in outputs(sweep_dir, tail=0)
    result = collect.collect(sweep_dir)
    assert len(result["rows"]) == 1 and result["rows"][0]["seeds"] == 2, outputs(sweep_dir)
    assert not result["missing"]
