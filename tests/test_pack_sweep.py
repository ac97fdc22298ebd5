"""Sweeps in packs (`launch.sweep --pack K`, `launch.packs`): how runs are grouped, what a packed
sweep refuses, and the study's learning-rate search (on 16-pixel slices) trained end to end as
one pack of 8 and collected run by run."""
from __future__ import annotations

import json
import os

import pytest

from conftest import assert_strict_json_tree, write_cohort
from launch import collect, packs, sweep
from launch.spec import Run
from test_evaluate import SPLITS

LR_SEARCH_16 = '''
from configs.sweeps import lr_search
def get_sweep(arg=None):
    sweep = lr_search.get_sweep(arg)
    sweep.data["q98"]["image_size"] = 16
    return sweep
'''
TINY = ["total_steps=3", "batch_size=4", "warmup_steps=1", "eval.batch_size=4",
        "eval.every_steps=3", "checkpoint.every_steps=3"]


def test_runs_are_grouped_by_what_cannot_vary_and_by_their_checkpoint_step():
    def run(seed=0, lr=1e-3, attention="dual", data="q98", config="configs/resnet.py:resnet18"):
        return Run(config, (("model.kwargs.attention", attention),
                            ("optimizer.learning_rate", lr)), seed, data)

    runs = [run(0), run(1), run(0, attention="none"), run(2, lr=3e-4), run(3),
            run(0, data="minmax"), run(4), run(5, config="configs/resnet.py:resnet34")]
    jobs = packs.group(runs, 3)
    assert [[r.name for r in job.runs] for job in jobs] == [
        [runs[0].name, runs[1].name, runs[3].name], [runs[2].name], [runs[4].name, runs[6].name],
        [runs[5].name], [runs[7].name]]
    assert [job.packed for job in jobs] == [True, False, True, False, False]
    # members of a pack resume together only from one step: a run stopped elsewhere is apart
    steps = {runs[1].name: 40}
    jobs = packs.group(runs[:2] + runs[3:5], 8, lambda r: steps.get(r.name, 0))
    assert [[r.seed for r in job.runs] for job in jobs] == [[0, 2, 3], [1]]
    # without packing, a job per run
    assert [len(job.runs) for job in packs.group(runs, None)] == [1] * len(runs)
    # augmentation magnitudes pack, but a step off (0) in one run keeps it out of the others'
    rotated = [Run("configs/resnet.py:resnet18", (("input.augment.rotate_degrees", degrees),
                                                  ("loss.class_weights", weighted)), 0, "q98")
               for degrees, weighted in ((10.0, True), (0.0, True), (20.0, False))]
    assert [[r.name for r in job.runs] for job in packs.group(rotated, 8)] == [
        [rotated[0].name, rotated[2].name], [rotated[1].name]]


def test_a_packed_sweep_refuses_what_a_pack_cannot_do(tmp_path):
    path = tmp_path / "lr.py"
    path.write_text(LR_SEARCH_16)
    base = ["--sweep", f"{path}:2", "--source", "unused", "--sweep_dir", str(tmp_path / "s")]
    with pytest.raises(ValueError, match="--pack 0: a pack holds at least one run"):
        sweep.build_plan(sweep.parse_args(base + ["--pack", "0"]))
    with pytest.raises(ValueError, match="a number of runs"):
        sweep.build_plan(sweep.parse_args(base + ["--pack", "many"]))
    with pytest.raises(ValueError, match="packed runs need input.source=device"):
        sweep.build_plan(sweep.parse_args(base + ["--set", "input.source=tfrecord"]))
    # --pack off: one process per run, the runs' configs as they are
    plan = sweep.build_plan(sweep.parse_args(base + ["--pack", "off"]))
    assert plan.pack is None and "input.source" not in " ".join(plan.commands(plan.runs[0])
                                                                ["train"])


def imagenet_like_weights(folder) -> str:
    """WEIGHTS_DIR with resnet18.safetensors converted from a random-init torchvision ResNet-18
    (no download): what the study sweeps load."""
    import torch
    import torchvision

    from her2jax import convert

    folder.mkdir()
    source = str(folder / "resnet18.pth")
    torch.save(torchvision.models.resnet18().state_dict(), source)
    assert convert.main(["--source", "torchvision", "--arch", "resnet18", source,
                         str(folder / "resnet18.safetensors")]) == 0
    return str(folder)


def test_lr_search_trains_as_one_pack_and_collects_every_run(tmp_path, capsys):
    cohort = str(tmp_path / "cohort")
    write_cohort(cohort, patients=18, splits=SPLITS)
    path = tmp_path / "lr_search_16.py"
    path.write_text(LR_SEARCH_16)
    sweep_dir = str(tmp_path / "sweep")
    args = ["--sweep", f"{path}:8", "--backend", "local", "--pack", "8", "--source", cohort,
            "--sweep_dir", sweep_dir, *[item for s in TINY for item in ("--set", s)]]
    # the study's sweep starts from ImageNet weights: refused while they are missing
    assert sweep.main(args + ["--weights_dir", str(tmp_path / "none")]) == 1
    assert "the runs load ImageNet weights that are not there: " \
        f"{tmp_path / 'none' / 'resnet18.safetensors'} (8 runs)" in capsys.readouterr().err
    assert not os.path.exists(sweep_dir)
    args += ["--weights_dir", imagenet_like_weights(tmp_path / "weights")]
    capsys.readouterr()
    assert sweep.main(args + ["--dry_run"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("pack pack8-") == 1 and printed.count("\ntrain ") == 1, printed
    assert f"--config.init.pretrained={tmp_path / 'weights' / 'resnet18.safetensors'}" in printed

    assert sweep.main(args) == 0, capsys.readouterr()
    capsys.readouterr()
    manifest = json.load(open(os.path.join(sweep_dir, "manifest.json")))
    entries = manifest["runs"]
    assert len(entries) == 8 and {e["status"] for e in entries} == {"finished"}
    assert len({e["pack"] for e in entries}) == 1          # one process trained them all
    result = collect.collect(sweep_dir)
    assert len(result["rows"]) == 8 and not result["missing"]
    for entry in entries:
        config = json.load(open(os.path.join(entry["workdir"], "config.json")))
        # each member trained with its own point of the search
        for key, value in entry["overrides"].items():
            node = config
            for part in key.split("."):
                node = node[part]
            assert node == value, key
        assert config["input"]["source"] == "device"
        log = open(entry["log"], encoding="utf-8").read()        # the pack's process log
        assert f"pretrained {tmp_path / 'weights' / 'resnet18.safetensors'}: " in log
        assert config["init"]["pretrained"] == str(tmp_path / "weights" / "resnet18.safetensors")
        metrics = json.load(open(os.path.join(entry["workdir"], "eval", "test", "metrics.json")))
        row = next(r for r in result["rows"] if r["configuration"] == entry["group"])
        assert row["test_auc_mean"] == pytest.approx(metrics["patient"]["auc"], nan_ok=True)
    # every JSON file the sweep wrote (manifest, runs' configs and logs, evaluations, the
    # datasets' reports and the leaderboard's folder) is strict JSON
    written = set(assert_strict_json_tree(sweep_dir))
    assert {"manifest.json", "metrics.jsonl", "metrics.json", "config.json",
            "metadata.json"} <= written, written
    # the relaunch finds every run finished and starts nothing
    assert sweep.main(args) == 0
    out = capsys.readouterr().out
    assert out.count("finished, skipped") == 8 and "started" not in out


def test_pack_auto_fits_as_many_members_as_the_measured_memory_allows(
        tmp_path, monkeypatch, capsys):
    import subprocess

    from her2jax.data import resident
    from her2jax.training import pack_memory

    cohort = str(tmp_path / "cohort")
    write_cohort(cohort, patients=12, splits=SPLITS[:12])
    path = tmp_path / "lr_search_16.py"
    path.write_text(LR_SEARCH_16)
    args = ["--sweep", f"{path}:4", "--pack", "auto", "--source", cohort, "--sweep_dir",
            str(tmp_path / "sweep"), "--set", "batch_size=4"]
    plan = sweep.build_plan(sweep.parse_args(args))
    for command in plan.prepare_commands().values():
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    from configs import common

    model = common.load("configs/resnet.py:resnet18")
    model.batch_size = 4
    model.input.source = model.input.augment_on = "device"
    one, two = (pack_memory.step_bytes(model, 16, k) for k in (1, 2))
    assert 0 < one < two < 2.1 * one           # a member's share, and what the members share
    data_dir = next(iter(plan.datasets.values()))
    data = sum(resident.split_bytes(data_dir, split) for split in ("train", "validation"))
    # room for exactly two members beside the data and the shared part
    free = int((data + two + (two - one) // 2) / pack_memory.HEADROOM) + 1
    monkeypatch.setattr(resident, "free_bytes", lambda device: free)
    capsys.readouterr()
    assert sweep.main(args + ["--dry_run"]) == 0
    printed = capsys.readouterr().out
    assert "pack auto: 2 of 4 runs" in printed, printed
    assert printed.count("pack pack2-") == 2, printed
    monkeypatch.setattr(resident, "free_bytes", lambda device: one // 2)
    assert sweep.main(args + ["--dry_run"]) == 1
    assert "--pack auto: one run needs about" in capsys.readouterr().err
    with pytest.raises(ValueError, match="give --pack K for the slurm backend"):
        sweep.build_plan(sweep.parse_args(args + ["--backend", "slurm"]))
