"""Attention modules: outputs known by hand, the published formulas, shapes and dtypes."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from her2jax.models.attention import (KINDS, ChannelAttention, ChannelThenSpatial,
                                      DualSelfAttention, Identity, SpatialAttention,
                                      make_attention)


def features(shape=(2, 5, 6, 16), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def parameters(module: nnx.Module) -> dict[str, nnx.Variable]:
    return {"/".join(map(str, path)): variable
            for path, variable in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def channel_reference(module: ChannelAttention, x: np.ndarray) -> np.ndarray:
    """s = sigmoid(sum over pools of W2 relu(W1 p + b1) + b2), y = x * s."""
    w1, b1 = np.asarray(module.fc1.kernel[...]), np.asarray(module.fc1.bias[...])
    w2, b2 = np.asarray(module.fc2.kernel[...]), np.asarray(module.fc2.bias[...])
    pools = [x.mean(axis=(1, 2))] + ([x.max(axis=(1, 2))] if module.pool == "avg+max" else [])
    logits = sum(np.maximum(p @ w1 + b1, 0) @ w2 + b2 for p in pools)
    return x * sigmoid(logits)[:, None, None, :]


def test_none_is_identity_without_parameters():
    module = make_attention("none", 16, rngs=nnx.Rngs(0))
    x = features()
    assert isinstance(module, Identity) and parameters(module) == {}
    np.testing.assert_array_equal(np.asarray(module(x)), x)


@pytest.mark.parametrize("pool", ["avg", "avg+max"])
def test_channel_attention_with_zero_weights_halves_the_input(pool):
    module = ChannelAttention(16, pool=pool, rngs=nnx.Rngs(0))
    for variable in parameters(module).values():
        variable[...] = jnp.zeros(variable.shape)
    x = features()
    np.testing.assert_allclose(np.asarray(module(x)), x / 2, rtol=1e-6)


@pytest.mark.parametrize("pool", ["avg", "avg+max"])
def test_channel_attention_follows_its_formula(pool):
    module = ChannelAttention(64, reduction=16, pool=pool, rngs=nnx.Rngs(0))
    module.fc2.bias[...] = jnp.linspace(-1.0, 1.0, 64)
    assert module.fc1.out_features == 4
    x = features((2, 5, 6, 64))
    np.testing.assert_allclose(np.asarray(module(x)), channel_reference(module, x),
                               rtol=1e-5, atol=1e-6)
    assert ChannelAttention(16, reduction=16, rngs=nnx.Rngs(0)).fc1.out_features == 1


def test_spatial_attention_centre_tap_reads_channel_mean_then_max():
    module = SpatialAttention(rngs=nnx.Rngs(0))
    kernel = np.zeros((7, 7, 2, 1), np.float32)
    kernel[3, 3, :, 0] = [0.7, -0.4]
    module.conv.kernel[...] = jnp.asarray(kernel)
    module.conv.bias[...] = jnp.array([0.25])
    x = features()
    gate = sigmoid(0.7 * x.mean(axis=-1) - 0.4 * x.max(axis=-1) + 0.25)[..., None]
    np.testing.assert_allclose(np.asarray(module(x)), x * gate, rtol=1e-5, atol=1e-6)


def test_spatial_attention_pads_with_zeros_and_keeps_the_size():
    """Uniform input 1 and a kernel of 0.01: the logit is 0.01 * 2 * (taps inside the image)."""
    module = SpatialAttention(rngs=nnx.Rngs(0))
    module.conv.kernel[...] = jnp.full((7, 7, 2, 1), 0.01)
    module.conv.bias[...] = jnp.zeros((1,))
    x = np.ones((1, 9, 8, 4), np.float32)
    rows = np.array([min(i + 3, 8) - max(i - 3, 0) + 1 for i in range(9)])
    cols = np.array([min(j + 3, 7) - max(j - 3, 0) + 1 for j in range(8)])
    gate = sigmoid(0.02 * rows[:, None] * cols[None, :])
    np.testing.assert_allclose(np.asarray(module(x))[0, :, :, 0], gate, rtol=1e-5)


@pytest.mark.parametrize("kind,pool", [("cbam", "avg+max"), ("dual", "avg")])
def test_cbam_and_dual_are_channel_then_spatial(kind, pool):
    module = make_attention(kind, 32, reduction=8, rngs=nnx.Rngs(0))
    assert isinstance(module, ChannelThenSpatial) and module.channel.pool == pool
    module.spatial.conv.bias[...] = jnp.array([0.5])
    x = features((2, 5, 6, 32))
    after_channel = channel_reference(module.channel, x)
    expected = module.spatial(after_channel)
    np.testing.assert_allclose(np.asarray(module(x)), np.asarray(expected), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(expected), after_channel)


def danet_reference(x: np.ndarray, module: DualSelfAttention) -> np.ndarray:
    """The DANet reference (PAM_Module + CAM_Module) in its NCHW bmm form, summed with one x."""
    n, h, w, c = x.shape
    chw = x.transpose(0, 3, 1, 2).reshape(n, c, h * w)

    def conv1x1(layer: nnx.Conv) -> np.ndarray:  # (N, C_out, P)
        kernel = np.asarray(layer.kernel[...])[0, 0]
        return np.einsum("ncp,co->nop", chw, kernel) + np.asarray(layer.bias[...])[None, :, None]

    def softmax(z: np.ndarray) -> np.ndarray:
        z = np.exp(z - z.max(axis=-1, keepdims=True))
        return z / z.sum(axis=-1, keepdims=True)

    position = module.position
    query = conv1x1(position.query).transpose(0, 2, 1)                 # (N, P, C/8)
    attention = softmax(query @ conv1x1(position.key))                  # (N, P, P)
    pam = conv1x1(position.value) @ attention.transpose(0, 2, 1)        # (N, C, P)
    energy = chw @ chw.transpose(0, 2, 1)                               # (N, C, C)
    cam = softmax(energy.max(axis=-1, keepdims=True) - energy) @ chw    # (N, C, P)
    out = (chw + float(position.gamma[...]) * pam + float(module.channel.gamma[...]) * cam)
    return out.reshape(n, c, h, w).transpose(0, 2, 3, 1)


def test_danet_starts_as_identity():
    module = make_attention("danet", 16, rngs=nnx.Rngs(0))
    assert float(module.position.gamma[...]) == 0 and float(module.channel.gamma[...]) == 0
    x = features()
    np.testing.assert_array_equal(np.asarray(module(x)), x)


def test_danet_on_a_constant_input():
    """Constant c: all positions alike, so A is uniform and the position term is v = c sum(Wv) + bv;
    the channel energies are all equal, so the channel term is the channel mean, c."""
    module = DualSelfAttention(16, rngs=nnx.Rngs(0))
    x = np.full((1, 4, 5, 16), 0.3, np.float32)
    module.position.gamma[...] = jnp.array(1.0)
    value = 0.3 * np.asarray(module.position.value.kernel[...])[0, 0].sum(axis=0)
    value += np.asarray(module.position.value.bias[...])
    np.testing.assert_allclose(np.asarray(module(x)), x + value, rtol=1e-5, atol=1e-6)
    module.position.gamma[...] = jnp.array(0.0)
    module.channel.gamma[...] = jnp.array(1.0)
    np.testing.assert_allclose(np.asarray(module(x)), 2 * x, rtol=1e-6)


def test_danet_matches_the_reference_formulas():
    module = DualSelfAttention(32, rngs=nnx.Rngs(0))
    module.position.gamma[...] = jnp.array(0.7)
    module.channel.gamma[...] = jnp.array(-0.3)
    x = features((2, 4, 5, 32)) * 0.2
    np.testing.assert_allclose(np.asarray(module(x)), danet_reference(x, module),
                               rtol=1e-5, atol=1e-5)
    assert module.position.query.out_features == 32 // 8
    assert module.position.value.out_features == 32


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_keeps_the_shape_and_runs_in_bfloat16(kind):
    x = features((2, 7, 6, 32))
    module = make_attention(kind, 32, rngs=nnx.Rngs(0))
    assert module(x).shape == x.shape
    half = make_attention(kind, 32, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    y = half(jnp.asarray(x, jnp.bfloat16))
    assert y.shape == x.shape and y.dtype == jnp.bfloat16
    assert all(v.dtype == jnp.float32 for v in parameters(half).values())
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(module(x)), rtol=0.05,
                               atol=0.05)


def test_unknown_kind_lists_the_kinds():
    with pytest.raises(ValueError, match="choose from none, channel, spatial, cbam, dual, danet"):
        make_attention("squeeze", 16, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown pool"):
        ChannelAttention(16, pool="max", rngs=nnx.Rngs(0))
