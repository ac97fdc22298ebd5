"""benchmarks/sweep.py in tiny shapes: one sweep run two ways (one process per run from the
device-resident data, and one pack), every run finished, the table and JSON written."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_sweep_measured_unpacked_and_packed(tmp_path):
    out = tmp_path / "bench"
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "sweep.py"), "--runs", "2", "--ways",
         "1,2", "--steps", "4", "--batch", "4", "--image_size", "16", "--patients", "12",
         "--out", str(out)], cwd=ROOT, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:]
    rows = json.load(open(out / "sweep.json"))["rows"]
    assert [(r["way"], r["runs"], r["processes"]) for r in rows] == [("1", 2, 2), ("2", 2, 1)]
    assert all(r["wall_seconds"] > 0 and 0 < r["step_share"] < 1 for r in rows), rows
    table = (out / "sweep.md").read_text()
    assert "| 2 | 1 |" in table and "speed-up vs 1" in table
