"""Sweeps: expansion and stable names, the SLURM and Cloud TPU dry runs line by line, skip /
retry logic, the study's sweep files, and a local end-to-end sweep of two tiny runs followed by
`launch.collect`."""
from __future__ import annotations

import json
import os
import tempfile
import textwrap
import time

import pytest

from conftest import write_cohort
from test_evaluate import SPLITS
from launch import spec, sweep
from launch.spec import Run, Sweep, axis, product, runs_of, seeds, zip_axes

TINY_SWEEP = '''
from launch.spec import Sweep, axis, product, seeds
def get_sweep(arg=None):
    return Sweep("tiny", runs=product(axis("config", ["configs/resnet.py:resnet18"]),
                                      axis("model.kwargs.attention", ["none", "dual"]), seeds(1),
                                      base={"data": "q98"}),
                 data={"q98": {"normalization": "per_channel_clip_q98", "image_size": 16}},
                 pivot=("model.kwargs.attention", "seed"))
'''
Q98 = "per_channel_clip_q98_34a0dc07/1.0.0"     # the dataset name of that variant


@pytest.fixture
def sweep_file(tmp_path):
    path = tmp_path / "tiny.py"
    path.write_text(TINY_SWEEP)
    return str(path)


def test_product_zip_and_seeds_expand_in_order():
    runs = product(axis("config", ["c.py:a", "c.py:b"]),
                   zip_axes(axis("optimizer.learning_rate", [1e-3, 3e-4]),
                            axis("model.kwargs.dropout", [0.5, 0.1])),
                   seeds(2))
    assert len(runs) == 2 * 2 * 2
    assert [(r.config, r.settings["optimizer.learning_rate"], r.settings["model.kwargs.dropout"],
             r.seed) for r in runs[:4]] == [("c.py:a", 1e-3, 0.5, 0), ("c.py:a", 1e-3, 0.5, 1),
                                            ("c.py:a", 3e-4, 0.1, 0), ("c.py:a", 3e-4, 0.1, 1)]
    # stable, readable names: the same definition gives the same name in every session
    assert runs[0].name == "a-dropout=0.5-learning_rate=0.001-s0"
    assert runs[3].group == "a-dropout=0.1-learning_rate=0.0003"
    with pytest.raises(ValueError, match="one length"):
        zip_axes(axis("a", [1, 2]), axis("b", [1]))
    with pytest.raises(ValueError, match="two axes set"):
        product(axis("config", ["c.py:a"]), axis("seed", [0]), axis("seed", [1]))


def test_long_names_are_shortened_with_a_stable_hash():
    run = Run("configs/resnet.py:resnet18", tuple((f"key{i}", "x" * 20) for i in range(8)))
    again = Run("configs/resnet.py:resnet18", tuple((f"key{i}", "x" * 20) for i in range(8)))
    other = Run("configs/resnet.py:resnet18", tuple((f"key{i}", "x" * 20) for i in range(7)) +
                (("key7", "y" * 20),))
    assert len(run.group) <= spec.MAX_NAME and "~" in run.group
    assert run.name == again.name and run.group != other.group
    # keys that shorten alike keep their full names
    clash = Run("c.py:a", (("batch_size", 4), ("eval.batch_size", 8), ("model.kwargs.dropout", 0.1)))
    assert clash.group == "a-batch_size=4-eval.batch_size=8-dropout=0.1"


def test_sweep_refuses_duplicates_and_undeclared_data():
    with pytest.raises(ValueError, match="same definition"):
        Sweep("s", runs=runs_of([{"config": "c.py:a"}, {"config": "c.py:a"}]))
    with pytest.raises(ValueError, match="undeclared data"):
        Sweep("s", runs=runs_of([{"config": "c.py:a", "data": "q98"}]))
    with pytest.raises(ValueError, match="unknown preparation options"):
        Sweep("s", runs=runs_of([{"config": "c.py:a", "data": "x"}]), data={"x": {"colour": 1}})


@pytest.mark.parametrize("name, count", [("normalization", 42), ("n4", 6), ("attention", 192),
                                         ("architectures", 32), ("lr_search", 24), ("crop", 12)])
def test_the_studys_sweeps_load(name, count):
    loaded = sweep.load_sweep(f"configs/sweeps/{name}.py")
    assert len(loaded.runs) == count
    assert len({run.name for run in loaded.runs}) == count
    assert loaded.name == name
    assert sweep.unknown_override(loaded.runs) is None   # every override names a config key
    # every data variant prepares with real options
    for options in loaded.data.values():
        assert sweep.prepare_command("src", "out", options)[:3] == ["python", "-m",
                                                                    "data_prep.prepare"]


@pytest.mark.parametrize("name", ["normalization", "n4", "attention", "lr_search", "crop"])
def test_the_studys_sweeps_start_from_the_imagenet_weights_of_their_model(
        name, tmp_path, capsys):
    """Every run loads WEIGHTS_DIR/<its model>.safetensors, the model its config (or
    model.name) builds; the dry run shows the file in each train command."""
    from configs import common

    loaded = sweep.load_sweep(f"configs/sweeps/{name}.py")
    for run in loaded.runs:
        model = run.settings.get("model.name") or common.load(run.config).model.name
        assert run.settings["init.pretrained"] == f"weights/{model}.safetensors", run.name
    if name != "normalization":
        return
    args = ["--sweep", f"configs/sweeps/{name}.py:1", "--backend", "local", "--dry_run",
            "--source", str(tmp_path), "--sweep_dir", str(tmp_path / "sweep"), "--pack", "off",
            "--weights_dir", "/w"]
    assert sweep.main(args) == 0
    captured = capsys.readouterr()
    trains = [line for line in captured.out.splitlines() if line.startswith("train ")]
    assert len(trains) == len(loaded.runs) // 3
    for line in trains:
        model = "vit_small_patch16" if "configs/vit.py:small16" in line else "resnet18"
        assert f"--config.init.pretrained=/w/{model}.safetensors" in line, line
    assert "not there yet: /w/resnet18.safetensors (7 runs), /w/vit_small_patch16" in \
        captured.err


def test_the_crop_sweep_prepares_each_field_of_view(tmp_path, capsys):
    args = ["--sweep", "configs/sweeps/crop.py:64mm,128px", "--backend", "local", "--dry_run",
            "--source", str(tmp_path), "--sweep_dir", str(tmp_path / "sweep")]
    assert sweep.main(args) == 0
    printed = capsys.readouterr().out
    prepares = sorted(line for line in printed.splitlines() if line.startswith("prepare "))
    assert len(prepares) == 3
    assert prepares[0].startswith("prepare fixed128px: ") and \
        "--crop fixed --crop_size 128px" in prepares[0]
    assert "--crop fixed --crop_size 64mm" in prepares[1] and "--crop " not in prepares[2]
    # each variant's runs read the dataset its preparation writes
    assert "per_channel_clip_q98_fixed64mm/1.0.0" in printed
    assert "her2_dce/per_channel_clip_q98/1.0.0" in printed


def test_the_attention_sweep_has_no_identical_models():
    """Without attention the placement changes nothing: one 'none' run per depth, head, seed."""
    runs = sweep.load_sweep("configs/sweeps/attention.py").runs
    none = [run for run in runs if run.settings["model.kwargs.attention"] == "none"]
    assert {run.settings["model.kwargs.placement"] for run in none} == {"last"}
    assert len(none) == 3 * 2 * 2
    identities = [(run.settings["model.name"], run.settings["model.kwargs.head"], run.seed)
                  for run in none]
    assert len(set(identities)) == len(identities)
    placed = [run for run in runs if run.settings["model.kwargs.attention"] == "dual"]
    assert {run.settings["model.kwargs.placement"] for run in placed} == {"last", "stages",
                                                                         "blocks"}


def test_sweep_arguments_narrow_the_study_sweeps():
    assert len(sweep.load_sweep("configs/sweeps/attention.py:18").runs) == 64
    assert len(sweep.load_sweep("configs/sweeps/lr_search.py:5").runs) == 5
    first = sweep.load_sweep("configs/sweeps/lr_search.py").runs[:5]
    assert [r.name for r in first] == [r.name for r in
                                       sweep.load_sweep("configs/sweeps/lr_search.py:5").runs]


def test_dry_run_refuses_unknown_set_keys(sweep_file, capsys):
    assert sweep.main(["--sweep", sweep_file, "--dry_run", "--source", "/data/cohort",
                       "--set", "total_step=3"]) == 2
    captured = capsys.readouterr()
    assert not captured.out
    error = captured.err.splitlines()[-1]
    assert error.startswith("error: total_step: config has no key 'total_step'; did you mean "
                            '"total_steps"?')
    assert sweep.main(["--sweep", sweep_file, "--dry_run", "--source", "/data/cohort",
                       "--set", "total_steps=3"]) == 0


def test_slurm_dry_run_line_by_line(sweep_file, capsys):
    assert sweep.main(["--sweep", sweep_file, "--backend", "slurm", "--dry_run",
                       "--source", "/data/cohort", "--sweep_dir", "/scratch/sw",
                       "--repo", "/home/u/her2jax", "--partition", "gpu",
                       "--gpus_per_task", "1", "--nodes", "2"]) == 0
    run0, run1 = "resnet18-att=none-s0", "resnet18-att=dual-s0"
    data = f"/scratch/sw/data/her2_dce/{Q98}"

    def train(run, attention):
        return (f"python -m her2jax.main --config configs/resnet.py:resnet18 --workdir "
                f"/scratch/sw/runs/{run} --config.seed=0 --config.data_dir={data} "
                f"--config.model.kwargs.attention={attention}")

    expected = textwrap.dedent(f"""\
        # ---- /scratch/sw/slurm/prepare.sbatch
        #!/bin/bash
        #SBATCH --job-name=her2jax-tiny-prepare
        #SBATCH --time=24:00:00
        #SBATCH --cpus-per-task=8
        #SBATCH --partition=gpu
        #SBATCH --output=/scratch/sw/slurm/prepare_%j.out
        set -euo pipefail
        cd /home/u/her2jax
        [ -f .venv/bin/activate ] || {{ echo "no .venv in $PWD: run make setup there first" >&2; exit 1; }}
        source .venv/bin/activate
        # data variant q98 -> {data}
        python -m data_prep.prepare --source /data/cohort --data_dir /scratch/sw/data --quiet --image_size 16 --normalization per_channel_clip_q98

        # ---- /scratch/sw/slurm/runs.sbatch
        #!/bin/bash
        #SBATCH --job-name=her2jax-tiny
        #SBATCH --time=24:00:00
        #SBATCH --cpus-per-task=8
        #SBATCH --partition=gpu
        #SBATCH --array=0-1
        #SBATCH --output=/scratch/sw/slurm/%x_%A_%a.out
        #SBATCH --nodes=2
        #SBATCH --ntasks-per-node=1
        #SBATCH --gpus-per-task=1
        set -euo pipefail
        cd /home/u/her2jax
        [ -f .venv/bin/activate ] || {{ echo "no .venv in $PWD: run make setup there first" >&2; exit 1; }}
        source .venv/bin/activate
        case "$SLURM_ARRAY_TASK_ID" in
          0) RUN={run0}; WORKDIRS=(/scratch/sw/runs/{run0})
             TRAIN=({train(run0, "none")})
             EVALUATE=(python -m her2jax.evaluate --workdir /scratch/sw/runs/{run0} --split test --quiet) ;;
          1) RUN={run1}; WORKDIRS=(/scratch/sw/runs/{run1})
             TRAIN=({train(run1, "dual")})
             EVALUATE=(python -m her2jax.evaluate --workdir /scratch/sw/runs/{run1} --split test --quiet) ;;
          *) echo "no run for task $SLURM_ARRAY_TASK_ID"; exit 1 ;;
        esac
        finished=1; for folder in "${{WORKDIRS[@]}}"; do [ -f "$folder/eval/test/metrics.json" ] || finished=0; done
        if [ "$finished" = 1 ]; then echo "$RUN finished, skipped"; exit 0; fi
        srun "${{TRAIN[@]}}"
        "${{EVALUATE[@]}}"

        # ---- submit with
        PREPARE=$(sbatch --parsable /scratch/sw/slurm/prepare.sbatch)
        sbatch --dependency=afterok:$PREPARE /scratch/sw/slurm/runs.sbatch
        """)
    assert capsys.readouterr().out.splitlines() == expected.splitlines()
    assert not os.path.exists("/scratch/sw")          # a dry run writes nothing


def test_tpu_dry_run_line_by_line(sweep_file, capsys):
    assert sweep.main(["--sweep", sweep_file, "--backend", "tpu", "--dry_run", "--source",
                       "gs://b/cohort", "--sweep_dir", "gs://b/sw", "--queued", "--only",
                       "*dual*", "--tpu_name", "h2", "--zone", "europe-west4-a",
                       "--accelerator", "v5litepod-16", "--repo", "/home/u/her2jax"]) == 0
    archive = os.path.join(tempfile.gettempdir(), "her2jax-h2.tar.gz")
    run = "resnet18-att=dual-s0"
    ssh = "gcloud compute tpus tpu-vm ssh h2 --zone=europe-west4-a"
    expected = [
        "gcloud compute tpus queued-resources create h2-qr --node-id=h2 --zone=europe-west4-a "
        "--accelerator-type=v5litepod-16 --runtime-version=tpu-ubuntu2204-base --spot",
        "gcloud compute tpus queued-resources describe h2-qr --zone=europe-west4-a  "
        "# wait for state ACTIVE",
        f"git -C /home/u/her2jax archive --format=tar.gz --prefix=her2jax/ -o {archive} HEAD",
        f"gcloud compute tpus tpu-vm scp {archive} h2:~/her2jax.tar.gz --zone=europe-west4-a "
        f"--worker=all",
        f"{ssh} --worker=all --command='sudo add-apt-repository -y ppa:deadsnakes/ppa && "
        f"sudo apt-get install -y -qq python3.11 python3.11-venv && tar xzf her2jax.tar.gz && "
        f"cd her2jax && make setup PYTHON=python3.11 JAX_EXTRA=tpu'",
        f"{ssh} --worker=0 --command='mkdir -p her2jax_source && gcloud storage rsync -r "
        f"gs://b/cohort her2jax_source'",
        f"{ssh} --worker=0 --command='cd her2jax && .venv/bin/python -m data_prep.prepare "
        f"--source ../her2jax_source --data_dir ../her2jax_data --quiet --image_size 16 "
        f"--normalization per_channel_clip_q98'",
        f"{ssh} --worker=0 --command='gcloud storage rsync -r her2jax_data gs://b/sw/data'",
        f"{ssh} --worker=all --command='cd her2jax && .venv/bin/python -m her2jax.main --config "
        f"configs/resnet.py:resnet18 --workdir gs://b/sw/runs/{run} --config.seed=0 "
        f"--config.data_dir=gs://b/sw/data/her2_dce/{Q98} --config.model.kwargs.attention=dual "
        f"--multihost=on'",
        f"{ssh} --worker=all --command='cd her2jax && .venv/bin/python -m her2jax.evaluate "
        f"--workdir gs://b/sw/runs/{run} --split test --quiet --multihost=on'",
    ]
    assert capsys.readouterr().out.splitlines() == expected


def test_tpu_copies_a_local_manifest_cohort_to_worker_zero(sweep_file, capsys):
    assert sweep.main(["--sweep", sweep_file, "--backend", "tpu", "--dry_run", "--source",
                       "cohorts/ambl/manifest.csv", "--sweep_dir", "gs://b/sw", "--reuse",
                       "--only", "*dual*", "--tpu_name", "h2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "gcloud compute tpus tpu-vm scp --recurse cohorts/ambl h2:her2jax_source " \
           "--zone=us-central2-b --worker=0" in lines
    assert any("data_prep.prepare --source ../her2jax_source/manifest.csv "
               "--data_dir ../her2jax_data" in line for line in lines)
    assert not any("tpu-vm create" in line or "queued-resources" in line for line in lines)


def test_tpu_needs_a_bucket_and_data_needs_a_source(sweep_file, capsys):
    assert sweep.main(["--sweep", sweep_file, "--backend", "tpu", "--dry_run",
                       "--source", "x", "--sweep_dir", "/local"]) == 1
    assert "bucket" in capsys.readouterr().err
    assert sweep.main(["--sweep", sweep_file, "--dry_run"]) == 1
    assert "--source" in capsys.readouterr().err


def test_finished_runs_are_skipped_and_failed_ones_retried_on_request(sweep_file, tmp_path,
                                                                      capsys):
    sweep_dir = str(tmp_path / "sw")
    args = ["--sweep", sweep_file, "--sweep_dir", sweep_dir, "--source", "c", "--dry_run"]
    done = "resnet18-att=none-s0"
    failed = "resnet18-att=dual-s0"
    os.makedirs(os.path.join(sweep_dir, "runs", done, "eval", "test"))
    with open(os.path.join(sweep_dir, "runs", done, "eval", "test", "metrics.json"), "w") as f:
        f.write("{}")
    plan = sweep.build_plan(sweep.parse_args(args))
    manifest = plan.manifest()
    manifest["runs"][1].update(status="failed", log="x.log")
    sweep.write_manifest(sweep_dir, manifest)
    assert sweep.main(args) == 0
    out = capsys.readouterr().out
    assert f"finished, skipped: {done}" in out
    assert f"failed before, not retried (--retry_failed): {failed}" in out
    assert "train " not in out
    assert sweep.main(args + ["--retry_failed"]) == 0
    out = capsys.readouterr().out
    assert f"train {failed}: " in out and f"evaluate {failed}: " in out
    assert f"train {done}" not in out


def test_run_names_hold_what_varies_and_old_sweep_folders_keep_theirs(tmp_path, capsys):
    """lr_search:4 with --set keys: the names carry the varying keys with short aliases and
    compact values, none of the keys every run shares, and are the same in every launch; a
    sweep folder whose manifest lists the full names keeps them."""
    sweep_dir = str(tmp_path / "sw")
    args = ["--sweep", "configs/sweeps/lr_search.py:4", "--sweep_dir", sweep_dir,
            "--source", "c", "--pack", "off", "--set", "batch_size=8",
            "--set", "eval.every_steps=20", "--set", "checkpoint.every_steps=20"]
    plan = sweep.build_plan(sweep.parse_args(args))
    names = [run.name for run in plan.runs]
    assert len(set(names)) == 4
    for run, name in zip(plan.runs, names):
        settings = run.settings
        assert name == (f"resnet18-lr={_compact(settings['optimizer.learning_rate'])}-"
                        f"wd={_compact(settings['optimizer.weight_decay'])}-"
                        f"drop={settings['model.kwargs.dropout']:g}-"
                        f"ls={settings['loss.label_smoothing']:g}-s0")
        for common in ("batch_size", "every_steps", "q98", "init", "pretrained", "~"):
            assert common not in name
    assert names[0] == "resnet18-lr=8.11e-5-wd=1.02e-4-drop=0.5-ls=0.15-s0"
    assert [run.name for run in sweep.build_plan(sweep.parse_args(args)).runs] == names
    assert sweep.main(args + ["--dry_run"]) == 0            # what the dry run prints
    printed = capsys.readouterr().out
    assert [line.split(":")[0].removeprefix("train ") for line in printed.splitlines()
            if line.startswith("train ")] == names
    assert "batch_size" not in printed.replace("--config.batch_size=8", "")
    # collect's rows use the same names
    manifest = plan.manifest()
    assert [entry["name"] for entry in manifest["runs"]] == names
    assert {entry["group"] for entry in manifest["runs"]} == {n[:-3] for n in names}
    # a folder launched with the full names keeps them
    for entry, run in zip(manifest["runs"], plan.runs):
        entry["name"] = f"{run.full_group}-s{run.seed}"
    sweep.write_manifest(sweep_dir, manifest)
    kept = sweep.build_plan(sweep.parse_args(args)).runs
    assert [run.name for run in kept] == [entry["name"] for entry in manifest["runs"]]
    assert all("batch_size=8" in run.name for run in kept)


def _compact(value: float) -> str:
    mantissa, exponent = f"{value:.3e}".split("e")
    return f"{value:.4g}" if value >= 1e-3 else f"{float(mantissa):g}e{int(exponent)}"


def test_set_refuses_a_key_the_sweep_varies(sweep_file, tmp_path, capsys):
    """Setting the swept key would give every run one name and one folder at the same time."""
    args = ["--sweep", sweep_file, "--sweep_dir", str(tmp_path / "sw"), "--source", "c",
            "--dry_run"]
    assert sweep.main([*args, "--set", "model.kwargs.attention=cbam"]) == 1
    err = capsys.readouterr().err
    assert "--set model.kwargs.attention: sweep tiny varies this key ('dual', 'none')" in err
    assert sweep.main([*args, "--set", "total_steps=4"]) == 0     # a key it does not vary


def test_a_run_stopped_by_a_signal_is_resumed_by_the_next_launch(sweep_file, tmp_path,
                                                                 monkeypatch, capsys):
    """Training exits 143 after SIGTERM (130 after Ctrl-C) with its checkpoint written: the run
    is 'stopped', not finished nor failed, and a plain relaunch picks it up again."""
    import subprocess

    sweep_dir = str(tmp_path / "sw")
    args = ["--sweep", sweep_file, "--sweep_dir", sweep_dir, "--source", "c", "--only", "*dual*"]
    plan = sweep.build_plan(sweep.parse_args(args))
    for data_dir in plan.datasets.values():              # data prepared already
        os.makedirs(data_dir)
        open(os.path.join(data_dir, "metadata.json"), "w").close()
    codes = iter([143, 1])
    monkeypatch.setattr(sweep, "_start", lambda plan, job, entries, *rest: (
        entries[job.runs[0].name].update(status="running", log="x.log")
        or subprocess.Popen(["bash", "-c", f"exit {next(codes)}"]), job, 0.0))
    assert sweep.main(args) == 0
    (entry,) = sweep.read_manifest(sweep_dir)["runs"]
    assert entry["status"] == "stopped" and entry["returncode"] == 143
    assert "(a relaunch resumes it)" in capsys.readouterr().out
    assert sweep.main(args) == 1                          # started again; this time it fails
    assert "started: " in capsys.readouterr().out
    assert sweep.read_manifest(sweep_dir)["runs"][0]["status"] == "failed"


def test_stopping_the_launcher_stops_every_run_it_started(sweep_file, tmp_path, monkeypatch,
                                                          capsys):
    """Ctrl-C or SIGTERM to `launch.sweep --parallel 2`: each run's process group gets SIGTERM
    (training writes its checkpoint), none is left running, and both are marked stopped."""
    import subprocess
    import types

    sweep_dir = str(tmp_path / "sw")
    args = ["--sweep", sweep_file, "--sweep_dir", sweep_dir, "--source", "c", "--parallel", "2"]
    plan = sweep.build_plan(sweep.parse_args(args))
    for data_dir in plan.datasets.values():
        os.makedirs(data_dir)
        open(os.path.join(data_dir, "metadata.json"), "w").close()
    started = []
    real_sleep = time.sleep

    def start(plan, job, entries, *rest):
        entries[job.runs[0].name].update(status="running", log="x.log")
        # a stand-in for `train && evaluate`: exits 143 on SIGTERM, as training does once its
        # handler is set (the marker says it is)
        marker = tmp_path / f"ready{len(started)}"
        process = subprocess.Popen(
            ["bash", "-c", f"trap 'exit 143' TERM; touch {marker}; sleep 60 & wait $!"],
            start_new_session=True)
        started.append((process, marker))
        return process, job, 0.0

    def interrupted(seconds):
        for _ in range(500):                 # Ctrl-C once both runs are under way
            if len(started) == 2 and all(marker.exists() for _, marker in started):
                break
            real_sleep(0.02)
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "_start", start)
    monkeypatch.setattr(sweep, "time", types.SimpleNamespace(sleep=interrupted,
                                                             perf_counter=lambda: 0.0))
    with pytest.raises(KeyboardInterrupt):
        sweep.main(args)
    assert len(started) == 2 and all(p.poll() is not None for p, _ in started)
    runs = sweep.read_manifest(sweep_dir)["runs"]
    assert [r["status"] for r in runs] == ["stopped", "stopped"]
    assert [r["returncode"] for r in runs] == [143, 143]


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("local_sweep")
    (root / "tiny.py").write_text(TINY_SWEEP)
    cohort = str(root / "a cohort")        # paths that need quoting in every command line
    write_cohort(cohort, patients=18, splits=SPLITS)
    sweep_dir = str(root / "sweep dir's")
    tiny = ["batch_size=4", "total_steps=3", "warmup_steps=1", "eval.every_steps=3",
            "eval.batch_size=4", "checkpoint.every_steps=3", "log_every_steps=1"]
    args = ["--sweep", str(root / "tiny.py"), "--sweep_dir", sweep_dir, "--source", cohort,
            *[item for setting in tiny for item in ("--set", setting)]]
    assert sweep.main(args) == 0
    return sweep_dir, args


def test_local_sweep_runs_records_and_skips(local_sweep, capsys):
    sweep_dir, args = local_sweep
    manifest = json.load(open(os.path.join(sweep_dir, "manifest.json")))
    assert [r["status"] for r in manifest["runs"]] == ["finished", "finished"]
    assert all(r["seconds"] > 0 and "her2jax.main" in r["commands"]["train"]
               for r in manifest["runs"])
    for run in manifest["runs"]:
        assert os.path.exists(os.path.join(run["workdir"], "eval", "test", "metrics.json"))
        config = json.load(open(os.path.join(run["workdir"], "config.json")))
        assert config["total_steps"] == 3 and config["data_dir"] == run["data_dir"]
    # a relaunch finds both finished
    capsys.readouterr()
    assert sweep.main(args) == 0
    assert capsys.readouterr().out.count("finished, skipped") == 2


def test_collect_builds_the_leaderboard_from_the_runs(local_sweep, capsys):
    from launch import collect

    sweep_dir, _ = local_sweep
    result = collect.collect(sweep_dir)
    manifest = json.load(open(os.path.join(sweep_dir, "manifest.json")))
    assert len(result["rows"]) == 2 and not result["missing"]
    for run in manifest["runs"]:
        metrics = json.load(open(os.path.join(run["workdir"], "eval", "test", "metrics.json")))
        row = next(r for r in result["rows"] if r["configuration"] == run["group"])
        assert row["test_auc_mean"] == pytest.approx(metrics["patient"]["auc"], nan_ok=True)
        assert row["seeds"] == 1
    assert os.path.exists(os.path.join(sweep_dir, "collect", "leaderboard.md"))
    assert os.path.exists(os.path.join(sweep_dir, "collect", "leaderboard.png"))


def test_local_parallel_runs_get_their_own_devices_and_threads(sweep_file, tmp_path):
    args = sweep.parse_args(["--sweep", sweep_file, "--sweep_dir", str(tmp_path / "sw"),
                             "--source", "unused"])
    plan = sweep.build_plan(args)
    plan.datasets = {}                      # nothing to prepare: the commands below are stand-ins

    def commands(run):
        workdir = plan.workdir(run)
        record = (f"mkdir -p {workdir}/eval/test && echo $CUDA_VISIBLE_DEVICES $OMP_NUM_THREADS "
                  f"$(date +%s.%N) > {workdir}/env && sleep 1 && date +%s.%N >> {workdir}/env "
                  f"&& echo '{{}}' > {workdir}/eval/test/metrics.json")
        return {"train": ["bash", "-c", record], "evaluate": ["true"]}

    plan.job_commands = lambda job: commands(job.runs[0])
    manifest = sweep.run_local(plan, parallel=2, devices=["3", "5"], cpu_threads=4)
    assert [r["status"] for r in manifest["runs"]] == ["finished", "finished"]
    seen = sorted(open(os.path.join(plan.workdir(run), "env")).read().split()[0]
                  for run in plan.runs)
    assert seen == ["3", "5"]
    assert all(open(os.path.join(plan.workdir(run), "env")).read().split()[1] == "4"
               for run in plan.runs)
    # both ran at once: their time windows overlap
    windows = [[float(x) for x in open(os.path.join(plan.workdir(run), "env")).read().split()[2:]]
               for run in plan.runs]
    assert max(w[0] for w in windows) < min(w[1] for w in windows), windows
