"""Swin-T: timm's logits from converted weights, the convert command, a training step."""
from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from her2jax import convert, models
from her2jax.models import swin, weights
from her2jax.models.swin import from_timm_swin

NAME = "swin_tiny_patch4_window7"


def timm_swin(num_classes: int, seed: int = 0, **kwargs):
    """A randomly initialised timm Swin-T in eval mode, its weights spread so that every layer
    (the relative position bias tables included) moves the logits."""
    import timm
    import torch

    torch.manual_seed(seed)
    net = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False,
                            num_classes=num_classes, **kwargs)
    with torch.no_grad():
        for name, parameter in net.named_parameters():
            if name.endswith("relative_position_bias_table"):
                parameter.normal_(0.0, 1.0)
            elif parameter.ndim >= 2:             # kernels: unit output scale
                parameter.normal_(0.0, parameter[0].numel() ** -0.5)
            elif name.endswith("bias"):
                parameter.normal_(0.0, 0.1)
            else:                                 # LayerNorm scales
                parameter.normal_(1.0, 0.1)
    return net.eval()


def state_of(net) -> dict[str, np.ndarray]:
    return {key: value.detach().numpy() for key, value in net.state_dict().items()}


@pytest.mark.parametrize("image_size, window_size", [(224, 7), (40, 3)])
def test_converted_timm_swin_gives_its_logits(image_size, window_size):
    """224 px: shifted, masked windows in stages 1-3, none in the last (7x7 map, one window).
    40 px with 3x3 windows: maps of 10 and 5 padded to whole windows, shifted and masked;
    odd maps merged; in the last stages the window shrinks to the 3x3 and 2x2 map."""
    import jax
    import torch

    net = timm_swin(3, img_size=image_size, window_size=window_size)
    model = models.create(NAME, num_classes=3, image_size=image_size, window_size=window_size,
                          rngs=nnx.Rngs(1))
    report = weights.load_pretrained(model, from_timm_swin(state_of(net)))
    assert not (report.missing or report.unused or report.mismatched), report.summary()
    assert "stages/2/blocks/5/attn/relative_position_bias_table" in report.loaded
    shifted = [(index, block.shift, block.window) for index, stage in enumerate(model.stages)
               for block in stage.blocks if any(block.shift)]
    if image_size == 224:
        assert shifted == [(0, (3, 3), (7, 7)), (1, (3, 3), (7, 7))] + [(2, (3, 3), (7, 7))] * 3
        assert (swin.shift_mask((56, 56), (7, 7), (3, 3)) == -100).any()
    else:
        assert shifted == [(0, (1, 1), (3, 3)), (1, (1, 1), (3, 3))]
        assert model.stages[3].blocks[1].window == (2, 2)
    model.eval()
    graph, state = nnx.split(model)
    forward = jax.jit(lambda state, images: nnx.merge(graph, state)(images))
    images = np.random.default_rng(0).normal(size=(2, image_size, image_size, 3))
    images = images.astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    logits = np.asarray(forward(state, images))
    assert logits.shape == (2, 3)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_convert_command_round_trip_and_wrong_checkpoints(tmp_path, capsys):
    import torch
    from safetensors.numpy import save_file

    state = state_of(timm_swin(1000))
    source, out = str(tmp_path / "swin.safetensors"), str(tmp_path / "swin_out.safetensors")
    save_file(state, source)
    assert convert.main(["--source", "timm-swin", "--arch", NAME, source, out]) == 0
    assert "missing (fresh) 0, shape mismatch (fresh) 0, unused 0" in capsys.readouterr().out

    model = models.create(NAME, num_classes=2, rngs=nnx.Rngs(0))
    report = weights.load_pretrained(model, out)       # as config.init.pretrained does
    assert sorted(report.mismatched) == ["head/bias (1000,)->(2,)",
                                         "head/kernel (768, 1000)->(768, 2)"]
    assert not (report.missing or report.unused), report.summary()
    np.testing.assert_array_equal(
        np.asarray(model.stages[2].blocks[5].attn.relative_position_bias_table[...]),
        state["layers.2.blocks.5.attn.relative_position_bias_table"])
    np.testing.assert_array_equal(np.asarray(model.stages[3].downsample.reduction.kernel[...]),
                                  state["layers.3.downsample.reduction.weight"].T)

    # a .pth with the index buffers of older checkpoints, named as timm names the model
    tensors = {key: torch.from_numpy(value) for key, value in state.items()}
    tensors["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)
    tensors["layers.0.blocks.1.attn.relative_position_index"] = torch.zeros(49, 49).long()
    torch.save(tensors, str(tmp_path / "swin.pth"))
    assert convert.main(["--source", "timm-swin", "--arch", NAME + "_224",
                         str(tmp_path / "swin.pth"), out + "2"]) == 0
    assert "unused 0" in capsys.readouterr().out

    # another model's file, and a deeper Swin (Swin-S: 18 blocks in stage 3), are refused
    other = str(tmp_path / "other.safetensors")
    save_file({"blocks.0.attn.qkv.weight": np.zeros((576, 192), np.float32)}, other)
    assert convert.main(["--source", "timm-swin", "--arch", NAME, other, out + "3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "keys with no counterpart in Swin-T" in err and "blocks.0.attn.qkv.weight" in err
    deeper = dict(state)
    for key, value in state.items():
        if key.startswith("layers.2.blocks.5."):
            deeper[key.replace(".blocks.5.", ".blocks.6.")] = value
    save_file(deeper, other)
    assert convert.main(["--source", "timm-swin", "--arch", NAME, other, out + "3"]) == 1
    err = capsys.readouterr().err
    assert "does not fit swin_tiny_patch4_window7" in err and "stages/2/blocks/6/" in err
    assert not (tmp_path / "swin_out.safetensors3").exists()


def test_original_layout_merges_at_the_end_of_stages():
    """The original checkpoints hold `layers.i.downsample` for i = 0..2 and `head.weight`."""
    state = {"layers.1.blocks.0.norm1.weight": np.ones(192, np.float32),
             "layers.2.downsample.reduction.weight": np.ones((768, 1536), np.float32),
             "head.weight": np.ones((1000, 768), np.float32)}
    timm_layout = {"layers.1.blocks.0.norm1.weight": state["layers.1.blocks.0.norm1.weight"],
                   "layers.3.downsample.reduction.weight":
                       state["layers.2.downsample.reduction.weight"],
                   "head.fc.weight": state["head.weight"]}
    original = from_timm_swin({"layers.0.downsample.norm.bias": np.zeros(384, np.float32),
                               **state})
    assert original["stages/1/downsample/norm/bias"].shape == (384,)
    converted = from_timm_swin(timm_layout)
    assert sorted(converted) == ["head/kernel", "stages/1/blocks/0/norm1/scale",
                                 "stages/3/downsample/reduction/kernel"]
    for key, value in converted.items():
        np.testing.assert_array_equal(original[key], value)


def test_options_are_checked():
    with pytest.raises(ValueError, match="unknown options \\['pool'\\]"):
        models.create(NAME, num_classes=2, pool="avg")
    with pytest.raises(ValueError, match="rates in \\[0, 1\\)"):
        models.create(NAME, num_classes=2, drop_path=1.0)
    with pytest.raises(ValueError, match="not a positive multiple of 4"):
        models.create(NAME, num_classes=2, image_size=30)


def test_one_training_step_runs_and_changes_the_parameters():
    import jax.numpy as jnp

    from her2jax.training.optim import create_optimizer
    from her2jax.training.steps import data_mesh, make_train_step, split_model

    model = models.create(NAME, num_classes=2, image_size=40, window_size=3, dropout=0.1,
                          drop_path=0.1, rngs=nnx.Rngs(0))
    rates = [block.drop_path1.rate for stage in model.stages for block in stage.blocks]
    np.testing.assert_allclose(rates, np.linspace(0.0, 0.1, 12))
    train_graph, _, params, rest = split_model(model)
    optimizer = create_optimizer(params, learning_rate=1e-3, warmup_steps=0, total_steps=10)
    step = make_train_step(train_graph, optimizer, data_mesh())
    images = np.random.default_rng(0).integers(0, 255, (2, 40, 40, 3)).astype(np.uint8)
    batch = {"image": jnp.asarray(images), "label": jnp.asarray([0, 1], jnp.int32)}
    table = ("stages", 0, "blocks", 1, "attn", "relative_position_bias_table")
    before = np.asarray(dict(nnx.to_flat_state(params))[table][...]).copy()
    kernel = np.asarray(params["head"]["kernel"][...]).copy()
    params, rest, _, metrics = step(params, rest, optimizer.init(params), batch)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    assert not np.allclose(np.asarray(dict(nnx.to_flat_state(params))[table][...]), before)
    assert params["head"]["kernel"][...].shape == (768, 2)
    assert not np.allclose(np.asarray(params["head"]["kernel"][...]), kernel)
