"""Configs: every variant builds its model; runlocal shrinks it; unknown keys fail loudly."""
import os
import subprocess
import sys

import pytest
from flax import nnx

from configs import common, resnet, vit
from her2jax import models, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("module, variant", [(resnet, v) for v in resnet.VARIANTS] +
                         [(vit, v) for v in vit.VARIANTS])
def test_every_variant_names_a_buildable_model(module, variant):
    config = module.get_config(variant)
    assert config.model.name in models.names()
    model = nnx.eval_shape(lambda: train.build_model(config, image_size=32))
    assert model is not None


def test_runlocal_shrinks_and_unknown_variants_fail():
    full, local = resnet.get_config("resnet34"), resnet.get_config("resnet34,runlocal")
    assert local.total_steps < full.total_steps and local.batch_size < full.batch_size
    assert local.model.to_dict() == full.model.to_dict()
    with pytest.raises(ValueError, match="unknown variant"):
        resnet.get_config("resnet7")
    with pytest.raises(ValueError, match="one variant at a time"):
        common.parse_arg("resnet18,resnet34")


def test_command_line_rejects_unknown_override_keys(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "her2jax.main", "--config", "configs/resnet.py:resnet18",
         "--workdir", str(tmp_path / "run"), "--config.optimizer.learning_rat=1e-3"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "learning_rat" in result.stderr
    assert not (tmp_path / "run").exists()


def test_command_line_asks_for_the_dataset(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "her2jax.main", "--config", "configs/resnet.py:resnet18,runlocal",
         "--workdir", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True,
        timeout=120)
    assert result.returncode != 0 and "--config.data_dir" in result.stderr
