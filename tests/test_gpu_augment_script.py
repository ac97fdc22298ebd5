"""benchmarks/gpu_augment.sh on this CPU in tiny shapes (one model): both variants."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_augment_script_on_a_cpu(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), SHAPE="--dry_run --device cpu",
               MODELS="vit_base16",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    env.pop("XLA_FLAGS", None)
    done = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_augment.sh")],
                          cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    for model in ("vit_base16",):
        variants = json.load(open(tmp_path / f"augment_{model}.json"))["variants"]
        assert [v["arguments"] for v in variants] == [[], ["--her2jax_augment"]]
        assert all(v["result"]["images_per_s"] > 0 for v in variants), variants
    assert "augmentation on the device" in (tmp_path / "gpu_augment.log").read_text()
    assert len(os.listdir(tmp_path)) <= 8
