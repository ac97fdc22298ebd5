"""benchmarks/scaling.py at a tiny size: one and two simulated devices run the same train step
(same first loss), and the figures come back as JSON."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                    "scaling.py")


def test_one_and_two_devices_agree(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("scaling_bench", PATH)
    scaling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scaling)
    out = str(tmp_path / "scaling.json")
    assert scaling.main(["--devices", "1,2", "--image_size", "32", "--batch", "4", "--steps",
                         "1", "--repeats", "1", "--json", out]) == 0
    results = json.load(open(out))["results"]
    assert [r["devices"] for r in results] == [1, 2]
    assert results[0]["first_loss"] == pytest.approx(results[1]["first_loss"], abs=1e-5)
    assert all(r["steps_per_second"] > 0 for r in results)
    assert "| 2 |" in capsys.readouterr().out
