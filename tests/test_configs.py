"""Configs: every variant builds its model; runlocal shrinks it; unknown keys and invalid values
fail loudly, in one line."""
import os
import subprocess
import sys

import pytest
from flax import nnx

from configs import common, resnet, vit
from her2jax import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("module, variant", [(resnet, v) for v in resnet.VARIANTS] +
                         [(vit, v) for v in vit.VARIANTS])
def test_every_variant_names_a_buildable_model(module, variant):
    config = module.get_config(variant)
    assert config.model.name in models.names()
    model = nnx.eval_shape(lambda: models.from_config(config, image_size=32))
    assert model is not None


def test_runlocal_shrinks_and_unknown_variants_fail():
    full, local = resnet.get_config("resnet34"), resnet.get_config("resnet34,runlocal")
    assert local.total_steps < full.total_steps and local.batch_size < full.batch_size
    assert local.model.to_dict() == full.model.to_dict()
    with pytest.raises(ValueError, match="unknown variant"):
        resnet.get_config("resnet7")
    with pytest.raises(ValueError, match="one variant at a time"):
        common.parse_arg("resnet18,resnet34")


@pytest.mark.parametrize("override, expected", [
    ("--config.optimizer.learning_rat=1e-3",
     """--config.optimizer.learning_rat: config.optimizer has no key 'learning_rat'; did you """
     """mean "optimizer.learning_rate"?"""),
    ("--config.modle.name=resnet18", 'did you mean "model"?'),
    ("--config.model.kwargs.extra=3", "(its keys: attention, dropout, head, placement)"),
    ("--config.total_steps=abc", "--config.total_steps=abc: invalid literal for int()"),
])
def test_command_line_rejects_bad_overrides_in_one_line(tmp_path, override, expected):
    result = subprocess.run(
        [sys.executable, "-m", "her2jax.main", "--config", "configs/resnet.py:resnet18",
         "--workdir", str(tmp_path / "run"), override],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert expected in result.stderr
    assert not (tmp_path / "run").exists()


def test_command_line_rejects_an_unknown_variant_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "her2jax.main", "--config=configs/resnet.py:resnet7",
         "--workdir", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "unknown variant 'resnet7'; choose from" in result.stderr


def test_command_line_refuses_invalid_choices_before_writing(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "her2jax.main", "--config", "configs/resnet.py:resnet18,runlocal",
         "--workdir", str(tmp_path / "run"), "--config.data_dir=nowhere",
         "--config.eval.aggregation=mediam"], cwd=ROOT, capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 1
    assert result.stderr == ("error: config.eval.aggregation 'mediam' is not one of: median, "
                             "mean, max\n")
    assert not (tmp_path / "run").exists()


def test_command_line_asks_for_the_dataset(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "her2jax.main", "--config", "configs/resnet.py:resnet18,runlocal",
         "--workdir", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True,
        timeout=120)
    assert result.returncode != 0 and "--config.data_dir" in result.stderr


def test_config_check_refuses_unknown_pack_layouts_and_reads_old_configs():
    from configs import resnet
    from her2jax.errors import InvalidSetting
    from her2jax.training import loop

    config = resnet.get_config("resnet18,runlocal")
    config.pack_layout = "grouped"
    with pytest.raises(InvalidSetting, match="config.pack_layout 'grouped' is not one of: auto"):
        loop.check_config(config)
    del config["pack_layout"]          # a config.json written before the key: "auto"
    loop.check_config(config)
    config.pack_devices = "everywhere"
    with pytest.raises(InvalidSetting, match="config.pack_devices 'everywhere' is not one of"):
        loop.check_config(config)


@pytest.mark.parametrize("choice, members, devices, spread", [
    ("auto", 4, 2, True), ("auto", 3, 2, False), ("auto", 4, 1, False), ("auto", 1, 2, False),
    ("data", 4, 2, False), ("members", 3, 2, True)])
def test_a_pack_spreads_its_members_over_the_devices_when_asked_or_when_they_divide(
        choice, members, devices, spread):
    from her2jax.training import loop

    assert loop.spread_members(choice, members, devices) is spread
