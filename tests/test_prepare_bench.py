"""benchmarks/prepare.py at a tiny size: both N4 settings are timed and tabulated."""
from __future__ import annotations

import importlib.util
import os

import pytest

PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                    "prepare.py")


def load():
    spec = importlib.util.spec_from_file_location("prepare_bench", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_for_nyul_with_and_without_n4(capsys):
    bench = load()
    assert bench.main(["--patients", "6", "--size", "32", "--slices", "12", "--image_size", "16",
                       "--repeats", "1", "--workers", "1", "--normalization", "nyul"]) == 0
    out = capsys.readouterr().out
    assert "normalization nyul" in out
    rows = [line for line in out.splitlines() if line.startswith("| no |") or
            line.startswith("| yes |")]
    assert [row.split("|")[1].strip() for row in rows] == ["no", "yes"]
    assert all(float(row.split("|")[5]) > 0 for row in rows)


def test_unknown_normalization_is_refused(capsys):
    with pytest.raises(SystemExit):
        load().main(["--normalization", "nyull"])
    assert "invalid choice: 'nyull'" in capsys.readouterr().err
