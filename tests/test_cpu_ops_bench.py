"""The CPU-gap benchmarks at tiny sizes: cpu_ops.py (dry mode), profile_ops.py, passes.py."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import cpu_ops  # noqa: E402

from her2jax.models import layers  # noqa: E402


def test_dry_run_times_library_rewrite_and_torch(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(layers.ENVIRONMENT, "off")
    out = tmp_path / "ops.json"
    rows = cpu_ops.main(["--dry_run", "--json", str(out)])
    assert [row["op"] for row in rows] == ["1x1 conv /2", "3x3 conv", "max pool 3x3 /2"]
    for row in rows:
        assert all(v > 0 for v in row["library_ms"] + row["torch_ms"])
    assert [len(row["library_ms"]) for row in rows] == [3, 3, 2]   # no kernel in a pool
    assert [len(row["torch_ms"]) for row in rows] == [3, 3, 2]
    assert rows[0]["rewrite_ms"][1] > 0 and rows[2]["rewrite_ms"][1] > 0
    assert rows[1]["rewrite_ms"] is None          # no rewrite for 3x3 convolutions
    assert os.environ[layers.ENVIRONMENT] == "off"   # the caller's setting is restored
    assert json.loads(out.read_text())["rows"][2]["shape"] == "16x16x8"
    printed = capsys.readouterr().out
    assert "| 3x3 conv | 16x16x8 -> 8 |" in printed and "| - |" in printed


def test_profile_groups_the_gradient_operations(capsys):
    import profile_ops

    groups = profile_ops.main(["--image_size", "32", "--batch", "2", "--steps", "1",
                               "--top", "500"])
    for name in ("convolution forward", "convolution input gradients",
                 "convolution kernel gradients", "other operations"):
        assert groups.get(name, 0) > 0, name
    printed = capsys.readouterr().out
    assert "| convolution kernel gradients |" in printed and "| ynn_fusion" in printed


def test_profile_groups_by_output_shape_and_op_name():
    import profile_ops

    assert profile_ops.group("ynn_fusion.3", "f32[64,3,3,64]{3,2,1,0} fusion(...)", 8) == \
        "convolution kernel gradients"
    assert profile_ops.group("ynn_fusion.4", 'f32[8,56,56,64] fusion(...), metadata={op_name='
                             '"jit(f)/transpose(jvp())/conv_general_dilated"}', 8) == \
        "convolution input gradients"
    assert profile_ops.group("ynn_fusion.5", "f32[8,56,56,64] fusion(...)", 8) == \
        "convolution forward"
    assert profile_ops.group("transpose_copy_fusion", "f32[64,56,56,8]", 8) == "transposes"
    assert profile_ops.group("loop_add_fusion", "f32[8]", 8) == "other operations"


def test_passes_times_both_frameworks(capsys):
    import passes

    rows = passes.main(["--models", "resnet18", "--image_size", "32", "--batch", "2",
                        "--repeats", "1"])
    (row,) = rows
    assert row["model"] == "resnet18_dual"
    assert all(t > 0 for t in row["her2jax_ms"] + row["torch_ms"])
    assert "| resnet18_dual |" in capsys.readouterr().out
