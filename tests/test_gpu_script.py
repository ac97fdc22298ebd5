"""benchmarks/gpu.sh in its DRY=1 mode on CPU: the comparison and scaling steps run end to end
and leave their JSON where the GPU run would."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_script_dry_mode(tmp_path):
    env = dict(os.environ, DRY="1", OUT=str(tmp_path),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    env.pop("XLA_FLAGS", None)
    done = subprocess.run(["bash", "benchmarks/gpu.sh"], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    for model in ("resnet18_dual", "vit_small16"):   # one process and one file per model
        compare = json.load(open(tmp_path / f"compare_{model}_bf16.json"))
        assert compare["complete"] and not compare["failures"]
        assert [r["model"] for r in compare["results"]] == [model]
        assert compare["results"][0]["her2jax"]["images_per_s"] > 0
        assert f"| {model} |" in (tmp_path / f"compare_{model}_bf16.md").read_text()
    scaling = json.load(open(tmp_path / "scaling.json"))
    assert scaling["results"][0]["steps_per_second"] > 0
