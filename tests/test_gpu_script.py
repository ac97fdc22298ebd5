"""benchmarks/gpu.sh in its DRY=1 mode on CPU: the test step, the comparisons and the scaling
step run end to end and leave their log and JSON where the GPU run would, in no more files than
a lent machine returns."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu.sh")
RETURNED_FILES = 8   # what a device machine sends back from $OUT at most


def named(model: str) -> str:
    """The table's row name: ViTs with the attention kernel that ran (written out on a CPU)."""
    return f"{model} (xla attention)" if model.startswith("vit") else model


def test_gpu_script_dry_mode(tmp_path):
    env = dict(os.environ, DRY="1", TESTS="1", OUT=str(tmp_path),
               TEST_FILES="tests/test_model_table.py::test_resnet18_flops_match_the_published_count",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    env.pop("XLA_FLAGS", None)
    done = subprocess.run(["bash", SCRIPT], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:]
    log = (tmp_path / "gpu.log").read_text()
    assert log.startswith("jax ") and "1 passed" in log, log[:3000]
    models = ("resnet18_dual", "vit_small16")
    for model in models:   # one process and one JSON per model, its table in the log
        compare = json.load(open(tmp_path / f"compare_{model}_bf16.json"))
        assert compare["complete"] and not compare["failures"]
        assert [r["model"] for r in compare["results"]] == [model]
        assert compare["results"][0]["her2jax"]["images_per_s"] > 0
        assert f"| {named(model)} |" in log
    # then report_compare's one table of both models, ahead of its versions line
    merged = log[:log.index("versions: python")].rsplit("| model |", 1)[1]
    assert all(f"| {named(model)} |" in merged for model in models), log[-3000:]
    scaling = json.load(open(tmp_path / "scaling.json"))
    assert scaling["results"][0]["steps_per_second"] > 0
    assert "| devices | steps/s |" in log
    # the ViTs with their default attention ('auto': written out on this CPU), then once more
    # with attention_kernel='xla' asked for
    vit = json.load(open(tmp_path / "compare_vit_small16_bf16.json"))
    assert vit["arguments"]["vit_attention"] == "auto"
    assert vit["environment"]["vit_attention_kernel"] == "xla"
    written = json.load(open(tmp_path / "attention_xla_vit_small16_bf16.json"))
    assert written["arguments"]["vit_attention"] == "xla" and not written["failures"]
    assert written["results"][0]["her2jax"]["images_per_s"] > 0
    assert "attention_kernel=" not in log   # no fallback warning: nothing asked for cuDNN
    expected = {"gpu.log", "scaling.json", "attention_xla_vit_small16_bf16.json"} | {
        f"compare_{m}_bf16.json" for m in models}
    assert set(os.listdir(tmp_path)) == expected


def test_gpu_run_fits_what_the_device_returns():
    """The full GPU run writes the log, scaling.json, the written-out-attention JSON and one JSON
    per model: all must come back."""
    text = open(SCRIPT).read()
    full = re.search(r'^\s*models="([^"]+)"\s*$', text.split("else", 1)[1], re.M).group(1).split()
    assert [entry.split(":")[0] for entry in full][:2] == ["resnet50_dual", "vit_base16"]
    assert 3 + len(full) <= RETURNED_FILES
