"""benchmarks/jax_variants.py: each variant in its own process with its own arguments and XLA
flags, ratios to the first, a failing variant reported while the rest go on."""
from __future__ import annotations

import argparse
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import jax_variants  # noqa: E402


def test_variants_run_side_by_side_and_a_failing_one_is_reported(tmp_path, monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    out = tmp_path / "variants.json"
    result = jax_variants.main([
        "--model", "vit_small16", "--json", str(out), "--timeout", "300",
        "--variant", "written out=--vit_attention xla",
        "--variant", "no fast math=--vit_attention xla|--xla_cpu_enable_fast_math=false",
        "--variant", "bad flag=|--no_such_xla_flag",
        "--", "--dry_run", "--device", "cpu"])
    written = json.loads(out.read_text())
    assert written["variants"] == json.loads(json.dumps(result["variants"]))
    first, second, bad = written["variants"]
    assert first["arguments"] == ["--vit_attention", "xla"] and not first["xla_flags"]
    assert second["xla_flags"] == "--xla_cpu_enable_fast_math=false"
    for variant in (first, second):
        assert variant["result"]["images_per_s"] > 0
        assert "--her2jax_only" in variant["command"] and "--no_flops" in variant["command"]
    # the same function under both: the same first loss
    assert first["result"]["first_loss"] == pytest.approx(second["result"]["first_loss"],
                                                          rel=1e-5)
    assert "no_such_xla_flag" in bad["error"]
    lines = result["table"].splitlines()
    assert lines[3].startswith("| written out |") and "| 1.00x |" in lines[3]
    ratio = second["result"]["images_per_s"] / first["result"]["images_per_s"]
    assert f"| {ratio:.2f}x |" in lines[4]
    assert lines[5].startswith("| bad flag | failed: ")


def test_variant_syntax():
    assert jax_variants.parse_variant("a=--x 1|--f=2") == {
        "name": "a", "arguments": ["--x", "1"], "xla_flags": "--f=2"}
    assert jax_variants.parse_variant("plain") == {"name": "plain", "arguments": [],
                                                   "xla_flags": ""}
    with pytest.raises(argparse.ArgumentTypeError, match="no name"):
        jax_variants.parse_variant("=--x")
    with pytest.raises(SystemExit):
        jax_variants.parse(["--model", "vit_small16", "--variant", "a", "--variant", "a"])
