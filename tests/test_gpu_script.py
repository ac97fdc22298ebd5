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
    for name in ("compare_resnet_bf16.json", "compare_vit_bf16.json", "scaling.json"):
        assert os.path.getsize(tmp_path / name) > 0, name
    resnet = json.load(open(tmp_path / "compare_resnet_bf16.json"))
    assert "resnet18_dual" in json.dumps(resnet)
    scaling = json.load(open(tmp_path / "scaling.json"))
    assert scaling["results"][0]["steps_per_second"] > 0
