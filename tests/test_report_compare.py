"""benchmarks/report_compare.py: per-model JSON files (as gpu.sh writes them) merge into the
table torch_compare.py prints for the same models in one run, and a chart; files from runs with
other settings are refused by name."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import report_compare  # noqa: E402
import torch_compare  # noqa: E402


@pytest.fixture(scope="module")
def per_model_files(tmp_path_factory):
    """One dry run of both models, split into one file per model like gpu.sh's."""
    folder = tmp_path_factory.mktemp("compare")
    whole = torch_compare.main(["--dry_run", "--device", "cpu", "--json",
                                str(folder / "both.json")])
    paths = []
    for result in whole["results"]:
        single = json.loads((folder / "both.json").read_text())
        single["results"] = [result]
        single["arguments"]["models"] = [result["model"]]
        path = folder / f"compare_{result['model']}.json"
        path.write_text(json.dumps(single))
        paths.append(str(path))
    return whole, paths


def rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


def test_merged_table_is_the_single_run_table_and_the_chart_is_drawn(per_model_files, tmp_path):
    whole, paths = per_model_files
    chart = tmp_path / "chart.png"
    text = report_compare.main(paths + ["--plot", str(chart)])
    assert rows(text) == rows(whole["table"])
    assert "INCOMPLETE" not in text and "versions: python" in text
    image = np.asarray(Image.open(chart).convert("L"))
    assert image.shape[0] > 100 and image.shape[1] > 400 and image.std() > 10   # not blank


def test_cut_off_files_are_flagged(per_model_files, tmp_path):
    _, paths = per_model_files
    cut = json.loads(open(paths[1]).read())
    cut["complete"] = False
    (tmp_path / "cut.json").write_text(json.dumps(cut))
    text = report_compare.main([paths[0], str(tmp_path / "cut.json")])
    assert f"INCOMPLETE {tmp_path / 'cut.json'}" in text


def test_files_from_other_settings_are_refused(per_model_files, tmp_path):
    _, paths = per_model_files
    other = json.loads(open(paths[1]).read())
    other["arguments"]["batch"] = 64
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match=r"other\.json was run with other settings \(batch: 2"):
        report_compare.main([paths[0], str(tmp_path / "other.json")])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SystemExit, match=r"cannot read .*bad\.json"):
        report_compare.main([str(tmp_path / "bad.json")])
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(SystemExit, match=r"list\.json is not a torch_compare\.py --json file"):
        report_compare.main([str(tmp_path / "list.json")])


def test_files_with_other_vit_attention_merge_with_named_rows(per_model_files, tmp_path):
    """The attention kernel may differ per file (gpu.sh's written-out ViT-B beside the default):
    the ViT rows say which ran; a file older than a setting counts as having its default."""
    _, paths = per_model_files
    fused = json.loads(open(paths[1]).read())
    fused["arguments"]["vit_attention"] = "cudnn"
    fused["environment"]["vit_attention_kernel"] = "cudnn"
    fused["environment"]["date_utc"] = "2026-11-27 15:00"
    (tmp_path / "fused.json").write_text(json.dumps(fused))
    older = json.loads(open(paths[0]).read())
    for key in ("her2jax_only", "no_flops", "cudnn_token_multiple"):
        del older["arguments"][key]
    (tmp_path / "older.json").write_text(json.dumps(older))
    text = report_compare.main([str(tmp_path / "older.json"), paths[1],
                                str(tmp_path / "fused.json")])
    names = [row.split(" | ")[0].lstrip("| ") for row in rows(text)[2:]]
    assert names == ["resnet18_dual", "vit_small16 (xla attention)",
                     "vit_small16 (cudnn attention)"]
    assert ", 2026-11-27 15:00" in text and "attention_kernel" not in text.splitlines()[0]
    older["arguments"]["no_flops"] = True   # a setting that changes what is measured still counts
    (tmp_path / "older.json").write_text(json.dumps(older))
    with pytest.raises(SystemExit, match=r"other settings \(no_flops: True"):
        report_compare.main([str(tmp_path / "older.json"), paths[1]])
