"""benchmarks/train.py on a tiny prepared dataset: the input alone (with and without the
augmentation) and input, step and end-to-end side by side."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import os

from conftest import prepare_args

from data_prep import prepare

PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                    "train.py")


def load():
    spec = importlib.util.spec_from_file_location("train_bench", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_input_alone_and_side_by_side(cohort, tmp_path, capsys):
    folder, _ = cohort
    with contextlib.redirect_stdout(io.StringIO()):
        assert prepare.main(prepare_args(folder, str(tmp_path / "prepared"))) == 0
    data_dir = next(os.path.join(root, "") for root, _, files in os.walk(tmp_path / "prepared")
                    if "dataset_info.json" in files)
    bench = load()
    common = ["--data_dir", data_dir, "--batch", "4", "--steps", "2", "--repeats", "2"]
    augmented = bench.main(common + ["--input_only"])
    plain = bench.main(common + ["--input_only", "--no_augment"])
    out = capsys.readouterr().out
    assert list(augmented) == list(plain) == ["input"]
    assert all(len(v) == 2 and min(v) > 0 for v in (augmented["input"], plain["input"]))
    assert "augmentation on the host" in out and "augmentation off" in out and "usable)" in out
    moved = bench.main(common + ["--augment_on", "device"])
    assert list(moved) == ["input", "step", "end-to-end"] and min(map(min, moved.values())) > 0
    out = capsys.readouterr().out
    assert "augmentation on the device" in out and "end-to-end / input = " in out
    resident = bench.main(common + ["--source", "device"])
    assert list(resident) == ["input", "step", "end-to-end"]
    assert min(map(min, resident.values())) > 0
    assert "device source, augmentation on the device" in capsys.readouterr().out
