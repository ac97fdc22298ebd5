"""benchmarks/gpu_vit.sh on this CPU (tiny shapes, no torch.compile, its first two variants): the
parity test step, the variants, and the fastest variant's comparison with PyTorch, in no more
files than a lent machine returns."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_vit_script_on_a_cpu(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), MODEL="vit_small16", COMPILE="",
               FIRST_VARIANTS="2",
               SHAPE="--dry_run --device cpu --dtype bfloat16",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    env.pop("XLA_FLAGS", None)
    done = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_vit.sh")], cwd=ROOT,
                          env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    log = (tmp_path / "gpu_vit.log").read_text()
    assert "needs an NVIDIA GPU" in log   # the parity test ran, and says why it skipped here
    variants = json.load(open(tmp_path / "vit_variants.json"))["variants"]
    assert len(variants) == 2 and all("result" in v for v in variants), variants
    assert [v["arguments"] for v in variants] == [["--vit_attention", "xla"],
                                                  ["--vit_attention", "cudnn"]]
    fastest = max(variants, key=lambda v: v["result"]["images_per_s"])
    compare = json.load(open(tmp_path / "compare_vit_small16_best_bf16.json"))
    assert compare["complete"] and not compare["failures"]
    for flag in fastest["arguments"][1::2]:   # the fastest variant's arguments were used
        assert flag in {str(v) for v in compare["arguments"].values()}
    assert (compare["environment"]["xla_flags"] or "") == fastest["xla_flags"]
    assert len(os.listdir(tmp_path)) <= 8
