"""benchmarks/gpu_sweep.sh in its tiny CPU mode (DRY=1): every step runs without TensorFlow and
writes its JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_sweep_script_dry_mode(tmp_path):
    # a sitecustomize on the path refuses TensorFlow: the GPU machine has none
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "tensorflow.py").write_text("raise ImportError('no TensorFlow on the GPU machine')\n")
    env = dict(os.environ, OUT=str(tmp_path / "out"), DRY="1",
               PYTHONPATH=str(guard),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    env.pop("XLA_FLAGS", None)
    done = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_sweep.sh")], cwd=ROOT,
                          env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:]
    log = (tmp_path / "out" / "gpu_sweep.log").read_text()
    assert "Traceback" not in log, log[-3000:]
    assert "synthetic uint8 split on the device" in log
    pack = json.load(open(tmp_path / "out" / "pack_resnet18_dual.json"))
    assert [(row["members"], row["layout"]) for row in pack["rows"]] == [
        (1, "single"), (2, "vmap"), (2, "map")]
    assert all(0 < row["projected_run"]["step_share"] < 1 for row in pack["rows"])
    assert all(row["images_per_second"] > 0 and row["compile_seconds"] > 0
               for row in pack["rows"])
    sizes = json.load(open(tmp_path / "out" / "pack_sizes.json"))
    assert [(row["members"], row["layout"]) for row in sizes["rows"]] == [
        (1, "single"), (2, "vmap")]          # auto: vmap on a CPU
    assert (tmp_path / "out" / "compare_resnet50_dual_b256.json").exists()
