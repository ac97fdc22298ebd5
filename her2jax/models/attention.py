"""Attention modules for convolutional feature maps, picked by name with `make_attention`.

Every module maps (N, H, W, C) to (N, H, W, C). The study's "dual attention" is unpublished, so
the kinds below are the candidates an ablation compares:

    none     y = x
    channel  squeeze-excite channel gate (SE-Net)
    spatial  CBAM spatial gate
    cbam     CBAM: channel gate on average- and max-pooled features, then the spatial gate
    dual     squeeze-excite (average pool only), then the CBAM spatial gate: the third-party
             reading of "dual attention" on the last ResNet-34 feature map
    danet    DANet position and channel self-attention, summed (Fu et al. 2019)

Parameters are float32; `dtype` is the compute dtype. Softmax energies are formed in float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from her2jax.errors import InvalidSetting
from her2jax.models.layers import conv_general_dilated

KINDS = ("none", "channel", "spatial", "cbam", "dual", "danet")
POOLS = ("avg", "avg+max")
SPATIAL_KERNEL = 7


class Identity(nnx.Module):
    """y = x; holds no parameters."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


class ChannelAttention(nnx.Module):
    """Squeeze-excite channel gate.

        pool='avg'      s = sigmoid(W2 relu(W1 mean_hw(x) + b1) + b2)                  (SE-Net)
        pool='avg+max'  s = sigmoid(MLP(mean_hw(x)) + MLP(max_hw(x))), one shared MLP  (CBAM)
        y = x * s, with s of shape (N, 1, 1, C)

    The hidden width is max(C // reduction, 1), as in SE-Net and CBAM (C=512, r=16 gives 32).
    """

    def __init__(self, channels: int, *, reduction: int = 16, pool: str = "avg",
                 rngs: nnx.Rngs, dtype: jnp.dtype | None = None):
        if pool not in POOLS:
            raise InvalidSetting(f"unknown pool {pool!r}; choose from {', '.join(POOLS)}")
        hidden = max(channels // reduction, 1)
        self.pool = pool
        self.fc1 = nnx.Linear(channels, hidden, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, channels, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)

    def mlp(self, pooled: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.relu(self.fc1(pooled)))

    def __call__(self, x: jax.Array) -> jax.Array:
        logits = self.mlp(jnp.mean(x, axis=(1, 2)))
        if self.pool == "avg+max":
            logits = logits + self.mlp(jnp.max(x, axis=(1, 2)))
        return x * jax.nn.sigmoid(logits)[:, None, None, :].astype(x.dtype)


class SpatialAttention(nnx.Module):
    """CBAM spatial gate: y = x * sigmoid(conv7x7([mean_c(x), max_c(x)])).

    The 7x7 convolution maps the two maps (channel mean first, channel max second) to one, with a
    bias and zero padding 3, so the gate has the input's height and width.
    """

    def __init__(self, *, rngs: nnx.Rngs, dtype: jnp.dtype | None = None):
        pad = SPATIAL_KERNEL // 2
        self.conv = nnx.Conv(2, 1, (SPATIAL_KERNEL, SPATIAL_KERNEL),
                             padding=((pad, pad), (pad, pad)), dtype=dtype,
                             param_dtype=jnp.float32, rngs=rngs)
        self.record = False

    def set_view(self, record: bool | None = None) -> None:
        """record: if True, each call sows its gate (N, H, W) in float32 as the
        `nnx.Intermediate` 'gate', to be read with `nnx.capture` (explanations do)."""
        if record is not None:
            self.record = record

    def __call__(self, x: jax.Array) -> jax.Array:
        maps = jnp.stack([jnp.mean(x, axis=-1), jnp.max(x, axis=-1)], axis=-1)
        gate = jax.nn.sigmoid(self.conv(maps))
        if self.record:
            self.sow(nnx.Intermediate, "gate", gate[..., 0].astype(jnp.float32))
        return x * gate.astype(x.dtype)


class ChannelThenSpatial(nnx.Module):
    """y = spatial(channel(x)): CBAM (channel pool 'avg+max') or SE then spatial ('avg')."""

    def __init__(self, channels: int, *, reduction: int = 16, pool: str = "avg+max",
                 rngs: nnx.Rngs, dtype: jnp.dtype | None = None):
        self.channel = ChannelAttention(channels, reduction=reduction, pool=pool, rngs=rngs,
                                        dtype=dtype)
        self.spatial = SpatialAttention(rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.spatial(self.channel(x))


def _flatten_positions(x: jax.Array) -> jax.Array:
    """(N, H, W, C) -> (N, P, C) with P = H * W positions."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


class PositionAttention(nnx.Module):
    """DANet position attention term, gamma * (A v), without the residual.

        q = x Wq + bq (C -> C/8), k = x Wk + bk (C -> C/8), v = x Wv + bv (C -> C)  (1x1 convs)
        A[i, j] = softmax_j(q_i . k_j)      over the P = H * W positions
        out_i = sum_j A[i, j] v_j;   returns gamma * out, gamma a learned scalar starting at 0
    """

    def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype: jnp.dtype | None = None):
        width = max(channels // 8, 1)

        def conv(out_channels: int) -> nnx.Conv:
            return nnx.Conv(channels, out_channels, (1, 1), dtype=dtype, param_dtype=jnp.float32,
                            rngs=rngs, conv_general_dilated=conv_general_dilated)

        self.query, self.key, self.value = conv(width), conv(width), conv(channels)
        self.gamma = nnx.Param(jnp.zeros((), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        q, k, v = (_flatten_positions(layer(x)) for layer in (self.query, self.key, self.value))
        energy = jnp.einsum("nic,njc->nij", q, k, preferred_element_type=jnp.float32)
        attention = jax.nn.softmax(energy, axis=-1).astype(v.dtype)
        out = jnp.einsum("nij,njc->nic", attention, v).reshape(x.shape)
        return (self.gamma[...] * out).astype(x.dtype)


class ChannelSelfAttention(nnx.Module):
    """DANet channel attention term, gamma * (A X), without the residual.

        X: (C, P) per image;  E = X X^T (C x C)
        A[c, d] = softmax_d(max_d' E[c, d'] - E[c, d])   (as the reference implementation)
        out = A X;  returns gamma * out, gamma a learned scalar starting at 0
    """

    def __init__(self):
        self.gamma = nnx.Param(jnp.zeros((), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        flat = _flatten_positions(x)
        energy = jnp.einsum("npc,npd->ncd", flat, flat, preferred_element_type=jnp.float32)
        energy = jnp.max(energy, axis=-1, keepdims=True) - energy
        attention = jax.nn.softmax(energy, axis=-1).astype(x.dtype)
        out = jnp.einsum("ncd,npd->npc", attention, flat).reshape(x.shape)
        return (self.gamma[...] * out).astype(x.dtype)


class DualSelfAttention(nnx.Module):
    """DANet dual attention: y = x + gamma_p * PositionOut(x) + gamma_c * ChannelOut(x).

    The reference sums PAM(x) = gamma_p * P + x and CAM(x) = gamma_c * C + x behind extra
    convolutions; here the residual is kept once, so with both gammas at their initial 0 the
    module is the identity and can sit inside a pretrained backbone.
    """

    def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype: jnp.dtype | None = None):
        self.position = PositionAttention(channels, rngs=rngs, dtype=dtype)
        self.channel = ChannelSelfAttention()

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.position(x) + self.channel(x)


def make_attention(kind: str, channels: int, *, reduction: int = 16, rngs: nnx.Rngs,
                   dtype: jnp.dtype | None = None) -> nnx.Module:
    """The attention module `kind` (one of KINDS) for feature maps with `channels` channels."""
    if kind == "none":
        return Identity()
    if kind == "channel":
        return ChannelAttention(channels, reduction=reduction, pool="avg", rngs=rngs, dtype=dtype)
    if kind == "spatial":
        return SpatialAttention(rngs=rngs, dtype=dtype)
    if kind in ("cbam", "dual"):
        pool = "avg+max" if kind == "cbam" else "avg"
        return ChannelThenSpatial(channels, reduction=reduction, pool=pool, rngs=rngs,
                                  dtype=dtype)
    if kind == "danet":
        return DualSelfAttention(channels, rngs=rngs, dtype=dtype)
    raise InvalidSetting(f"unknown attention {kind!r}; choose from {', '.join(KINDS)}")
