"""CvT-13: transformers' logits from converted weights, the convert command, a training step."""
from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from her2jax import convert, models
from her2jax.models import weights
from her2jax.models.cvt import from_transformers_cvt


def transformers_cvt(num_labels: int, seed: int = 0):
    """A randomly initialised transformers CvT-13 in eval mode, its weights spread so that every
    layer moves the logits and its BatchNorm running statistics far from 0 and 1."""
    import torch
    import transformers

    torch.manual_seed(seed)
    net = transformers.CvtForImageClassification(transformers.CvtConfig(num_labels=num_labels))
    with torch.no_grad():
        for name, parameter in net.named_parameters():
            if parameter.ndim >= 2:             # kernels, class token: unit output scale
                parameter.normal_(0.0, parameter[0].numel() ** -0.5)
            elif name.endswith("bias"):
                parameter.normal_(0.0, 0.1)
            else:                               # LayerNorm and BatchNorm scales
                parameter.normal_(1.0, 0.1)
        for name, buffer in net.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0.0, 0.5)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
    return net.eval()


def state_of(net) -> dict[str, np.ndarray]:
    return {key: value.detach().numpy() for key, value in net.state_dict().items()}


def test_converted_transformers_cvt_gives_its_logits():
    import jax
    import jax.numpy as jnp
    import torch

    net = transformers_cvt(num_labels=2)
    model = models.create("cvt13", num_classes=2, rngs=nnx.Rngs(1))
    report = weights.load_pretrained(model, from_transformers_cvt(state_of(net)))
    assert not (report.missing or report.unused or report.mismatched), report.summary()
    assert "stages/2/blocks/9/attn/conv_proj_k/bn/var" in report.loaded
    model.eval()
    graph, state = nnx.split(model)
    forward = jax.jit(lambda state, images: nnx.merge(graph, state)(images))
    images = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(images.transpose(0, 3, 1, 2))).logits.numpy()
    logits = np.asarray(forward(state, images))
    assert logits.shape == (2, 2)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)

    # the running statistics matter: with fresh ones (mean 0, variance 1) the logits are far off
    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.BatchNorm):
            module.mean[...] = jnp.zeros_like(module.mean[...])
            module.var[...] = jnp.ones_like(module.var[...])
    fresh = nnx.split(model)[1]
    assert np.abs(np.asarray(forward(fresh, images)) - expected).max() > 0.1


def test_convert_command_round_trip_and_wrong_checkpoints(tmp_path, capsys):
    from safetensors.numpy import save_file

    state = state_of(transformers_cvt(num_labels=1000))
    source, out = str(tmp_path / "cvt13.safetensors"), str(tmp_path / "cvt13_out.safetensors")
    save_file(state, source)
    assert convert.main(["--source", "hf-cvt", "--arch", "cvt13", source, out]) == 0
    assert "missing (fresh) 0, shape mismatch (fresh) 0, unused 0" in capsys.readouterr().out

    model = models.create("cvt13", num_classes=2, rngs=nnx.Rngs(0))
    report = weights.load_pretrained(model, out)       # as config.init.pretrained does
    assert sorted(report.mismatched) == ["head/bias (1000,)->(2,)",
                                         "head/kernel (384, 1000)->(384, 2)"]
    assert not (report.missing or report.unused), report.summary()
    np.testing.assert_array_equal(
        np.asarray(model.stages[0].blocks[0].attn.conv_proj_q.bn.mean[...]),
        state["cvt.encoder.stages.0.layers.0.attention.attention.convolution_projection_query"
              ".convolution_projection.normalization.running_mean"])

    # another model's file, and a deeper CvT (more blocks than CvT-13), are refused in one line
    other = str(tmp_path / "other.safetensors")
    save_file({"conv1.weight": np.zeros((64, 3, 7, 7), np.float32)}, other)
    assert convert.main(["--source", "hf-cvt", "--arch", "cvt13", other, out + "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "keys with no counterpart in CvT-13" in err and "conv1.weight" in err
    deeper = dict(state)
    for key, value in state.items():
        if ".stages.2.layers.9." in key:
            deeper[key.replace(".layers.9.", ".layers.10.")] = value
    save_file(deeper, other)
    assert convert.main(["--source", "hf-cvt", "--arch", "cvt13", other, out + "2"]) == 1
    err = capsys.readouterr().err
    assert "does not fit cvt13" in err and "stages/2/blocks/10/" in err
    assert not (tmp_path / "cvt13_out.safetensors2").exists()


def test_options_are_checked():
    with pytest.raises(ValueError, match="unknown options \\['pool'\\]"):
        models.create("cvt13", num_classes=2, pool="avg")
    with pytest.raises(ValueError, match="rates in \\[0, 1\\)"):
        models.create("cvt13", num_classes=2, drop_path=1.0)


def test_one_training_step_runs_and_updates_batch_statistics():
    import jax.numpy as jnp

    from her2jax.training.optim import create_optimizer
    from her2jax.training.steps import data_mesh, make_train_step, split_model

    model = models.create("cvt13", num_classes=2, dropout=0.1, drop_path=0.1, rngs=nnx.Rngs(0))
    train_graph, _, params, rest = split_model(model)
    optimizer = create_optimizer(params, learning_rate=1e-3, warmup_steps=0, total_steps=10)
    step = make_train_step(train_graph, optimizer, data_mesh())
    images = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3)).astype(np.uint8)
    batch = {"image": jnp.asarray(images), "label": jnp.asarray([0, 1], jnp.int32)}
    bn = ("stages", 2, "blocks", 0, "attn", "conv_proj_k", "bn")
    path = dict(nnx.to_flat_state(rest))
    before = np.asarray(path[bn + ("mean",)][...]).copy()
    kernel = np.asarray(params["head"]["kernel"][...]).copy()
    params, rest, _, metrics = step(params, rest, optimizer.init(params), batch)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    after = dict(nnx.to_flat_state(rest))
    assert not np.allclose(np.asarray(after[bn + ("mean",)][...]), before)
    assert params["head"]["kernel"][...].shape == (384, 2)
    assert not np.allclose(np.asarray(params["head"]["kernel"][...]), kernel)
