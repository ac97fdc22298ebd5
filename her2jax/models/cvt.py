"""CvT-13, the Convolutional vision Transformer (Wu et al. 2021), in HuggingFace's CvtConfig() form.

Three stages; stage s (widths 64, 192, 384; heads 1, 3, 6; blocks 1, 2, 10):

    x = LayerNorm(conv_s(x))                 token embedding: 7x7 stride 4 pad 2, then 3x3 s2 p1
    tokens = [cls;] x.reshape(N, H W, D)      class token in the last stage only
    tokens += DropPath(Attention(norm1(tokens)))
    tokens += DropPath(MLP(norm2(tokens)))    MLP: D -> 4D -> D, exact GELU
    logits = head(Dropout(norm(cls)))         after the last stage

Attention projects the H x W token map three times, each a depthwise 3x3 convolution (pad 1,
no bias) then BatchNorm, with stride 1 for queries and 2 for keys and values (a quarter of the
tokens), flattens each map, puts the class token (not convolved) in front and applies the
linear `proj_q`, `proj_k`, `proj_v`; then softmax(q k^T / sqrt(D)) v per head, with D the
stage width (not the head width, as CvT scales), and the linear `proj`. All LayerNorms use
epsilon 1e-5; the BatchNorms are the ResNet's (torch's epsilon and momentum), so `model.train()`
normalises with batch statistics and updates the running averages, `model.eval()` uses them.

Stochastic depth as CvT-13: none in the first two stages, in the last it rises linearly over
its blocks from 0 to `drop_path` (default 0.1), each rate applied to its residual branch.
`dropout` acts on the head input. Any image of at least 3 pixels a side is taken (there are no
position embeddings). `from_transformers_cvt` converts `CvtForImageClassification` weights.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from her2jax.errors import InvalidSetting
from her2jax.models.layers import Dropout
from her2jax.models.registry import register
from her2jax.models.resnet import batch_norm
from her2jax.models.vit import (MLP, WEIGHT_INIT, DropPath, layer_norm, linear, refuse_unknown,
                                torch_leaf)

WIDTHS = (64, 192, 384)
HEADS = (1, 3, 6)
DEPTHS = (1, 2, 10)
PATCH_SIZES = (7, 3, 3)
PATCH_STRIDES = (4, 2, 2)
PATCH_PADDING = (2, 1, 1)
QKV_KERNEL, KV_STRIDE = 3, 2
MLP_RATIO = 4
LAYER_NORM_EPS = 1e-5
OPTIONS = ("dropout", "drop_path", "dtype")


def _layer_norm(width: int, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return layer_norm(width, dtype, rngs, LAYER_NORM_EPS)


class ConvEmbed(nnx.Module):
    """Overlapping patches: LayerNorm(conv_k_stride(x)), torch's symmetric zero padding."""

    def __init__(self, in_channels: int, width: int, size: int, stride: int, pad: int, *,
                 dtype: jnp.dtype, rngs: nnx.Rngs):
        self.proj = nnx.Conv(in_channels, width, (size, size), strides=stride,
                             padding=((pad, pad), (pad, pad)), kernel_init=WEIGHT_INIT,
                             dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.norm = _layer_norm(width, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(self.proj(x))


class ConvProjection(nnx.Module):
    """bn(depthwise 3x3 convolution, stride `stride`, pad 1, no bias) of an NHWC token map."""

    def __init__(self, width: int, stride: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        pad = QKV_KERNEL // 2
        self.conv = nnx.Conv(width, width, (QKV_KERNEL, QKV_KERNEL), strides=stride,
                             padding=((pad, pad), (pad, pad)), feature_group_count=width,
                             use_bias=False, kernel_init=WEIGHT_INIT, dtype=dtype,
                             param_dtype=jnp.float32, rngs=rngs)
        self.bn = batch_norm(width, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.bn(self.conv(x))


class ConvAttention(nnx.Module):
    """Multi-head attention with convolutional projections (module docstring)."""

    def __init__(self, width: int, heads: int, with_cls_token: bool, *, dtype: jnp.dtype,
                 rngs: nnx.Rngs):
        self.heads = heads
        self.with_cls_token = with_cls_token
        self.scale = 1.0 / math.sqrt(width)
        self.conv_proj_q = ConvProjection(width, 1, dtype=dtype, rngs=rngs)
        self.conv_proj_k = ConvProjection(width, KV_STRIDE, dtype=dtype, rngs=rngs)
        self.conv_proj_v = ConvProjection(width, KV_STRIDE, dtype=dtype, rngs=rngs)
        self.proj_q = linear(width, width, dtype, rngs)
        self.proj_k = linear(width, width, dtype, rngs)
        self.proj_v = linear(width, width, dtype, rngs)
        self.proj = linear(width, width, dtype, rngs)

    def __call__(self, x: jax.Array, grid: tuple[int, int]) -> jax.Array:
        batch, _, width = x.shape
        cls, x = (x[:, :1], x[:, 1:]) if self.with_cls_token else (None, x)
        token_map = x.reshape(batch, *grid, width)

        def project(conv: ConvProjection, linear: nnx.Linear) -> jax.Array:
            tokens = conv(token_map).reshape(batch, -1, width)
            if cls is not None:
                tokens = jnp.concatenate([cls.astype(tokens.dtype), tokens], axis=1)
            return linear(tokens).reshape(batch, -1, self.heads, width // self.heads)

        query = project(self.conv_proj_q, self.proj_q)
        key = project(self.conv_proj_k, self.proj_k)
        value = project(self.conv_proj_v, self.proj_v)
        scores = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(scores * self.scale, axis=-1)
        mixed = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(value.dtype), value)
        return self.proj(mixed.reshape(batch, -1, width))


class Block(nnx.Module):
    """x += DropPath(attn(norm1 x)); x += DropPath(mlp(norm2 x))."""

    def __init__(self, width: int, heads: int, drop_path: float, with_cls_token: bool, *,
                 dtype: jnp.dtype, rngs: nnx.Rngs):
        self.norm1 = _layer_norm(width, dtype, rngs)
        self.attn = ConvAttention(width, heads, with_cls_token, dtype=dtype, rngs=rngs)
        self.drop_path1 = DropPath(drop_path, rngs=rngs)
        self.norm2 = _layer_norm(width, dtype, rngs)
        self.mlp = MLP(width, MLP_RATIO * width, dtype=dtype, rngs=rngs)
        self.drop_path2 = DropPath(drop_path, rngs=rngs)

    def __call__(self, x: jax.Array, grid: tuple[int, int]) -> jax.Array:
        x = x + self.drop_path1(self.attn(self.norm1(x), grid))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class Stage(nnx.Module):
    """Token embedding, then the blocks; the last stage keeps a class token in front."""

    def __init__(self, index: int, in_channels: int, drop_path: float, *, dtype: jnp.dtype,
                 rngs: nnx.Rngs):
        width = WIDTHS[index]
        self.with_cls_token = index == len(WIDTHS) - 1
        self.patch_embed = ConvEmbed(in_channels, width, PATCH_SIZES[index],
                                     PATCH_STRIDES[index], PATCH_PADDING[index], dtype=dtype,
                                     rngs=rngs)
        if self.with_cls_token:
            self.cls_token = nnx.Param(WEIGHT_INIT(rngs.params(), (1, 1, width)))
        rates = np.linspace(0.0, drop_path, DEPTHS[index])
        self.blocks = nnx.List([Block(width, HEADS[index], float(rate), self.with_cls_token,
                                      dtype=dtype, rngs=rngs) for rate in rates])

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """NHWC map -> (the next NHWC map, the class token (N, D) or None)."""
        x = self.patch_embed(x)
        batch, rows, cols, width = x.shape
        tokens = x.reshape(batch, rows * cols, width)
        if self.with_cls_token:
            cls = jnp.broadcast_to(self.cls_token[...].astype(tokens.dtype), (batch, 1, width))
            tokens = jnp.concatenate([cls, tokens], axis=1)
        for block in self.blocks:
            tokens = block(tokens, (rows, cols))
        if not self.with_cls_token:
            return tokens.reshape(batch, rows, cols, width), None
        return tokens[:, 1:].reshape(batch, rows, cols, width), tokens[:, 0]


class CvT(nnx.Module):
    """CvT-13 on NHWC images -> logits (batch, num_classes) in float32; see the module docstring."""

    def __init__(self, *, num_classes: int, dropout: float = 0.0, drop_path: float = 0.1,
                 dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if not (0.0 <= dropout < 1.0 and 0.0 <= drop_path < 1.0):
            raise InvalidSetting(f"dropout and drop_path are rates in [0, 1), got {dropout}, "
                                 f"{drop_path}")
        self.dtype = jnp.dtype(dtype)
        channels = (3,) + WIDTHS[:-1]
        rates = (0.0,) * (len(WIDTHS) - 1) + (drop_path,)
        self.stages = nnx.List([Stage(index, channels[index], rates[index], dtype=self.dtype,
                                      rngs=rngs) for index in range(len(WIDTHS))])
        self.norm = _layer_norm(WIDTHS[-1], self.dtype, rngs)
        self.head_drop = Dropout(dropout, rngs=rngs)
        self.head = linear(WIDTHS[-1], num_classes, self.dtype, rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        height, width = images.shape[1:3]
        if min(height, width) < PATCH_SIZES[0] - 2 * PATCH_PADDING[0]:
            raise InvalidSetting(f"image {height}x{width} is smaller than CvT's first "
                                 f"{PATCH_SIZES[0]}x{PATCH_SIZES[0]} patch with its padding")
        x, cls = images.astype(self.dtype), None
        for stage in self.stages:
            x, cls = stage(x)
        return self.head(self.head_drop(self.norm(cls))).astype(jnp.float32)


# ---------------------------------------------------------------- weights

_STAGE = re.compile(r"(?:cvt\.)?encoder\.stages\.(\d+)\.(.+)")
_BLOCK = re.compile(r"layers\.(\d+)\.(.+)\.(weight|bias|running_mean|running_var)")
_PROJECTION = re.compile(r"attention\.attention\.convolution_projection_(query|key|value)"
                         r"\.convolution_projection\.(convolution|normalization)")
_STAGE_PARTS = {
    "embedding.convolution_embeddings.projection": "patch_embed/proj",
    "embedding.convolution_embeddings.normalization": "patch_embed/norm",
}
_BLOCK_PARTS = {
    "layernorm_before": "norm1", "layernorm_after": "norm2",
    "attention.attention.projection_query": "attn/proj_q",
    "attention.attention.projection_key": "attn/proj_k",
    "attention.attention.projection_value": "attn/proj_v",
    "attention.output.dense": "attn/proj",
    "intermediate.dense": "mlp/fc1", "output.dense": "mlp/fc2",
}
_TOP_PARTS = {"layernorm": "norm", "classifier": "head"}
_LEAVES = {"bias": "bias", "running_mean": "mean", "running_var": "var"}


def _module_path(key: str) -> tuple[str, str] | None:
    """HuggingFace key -> (our module path, torch leaf name), or None when there is none."""
    *module, leaf = key.split(".")
    stage = _STAGE.fullmatch(key)
    if stage is None:
        part = _TOP_PARTS.get(".".join(module))
        return (part, leaf) if part and leaf in ("weight", "bias") else None
    index, rest = stage.groups()
    if rest == "cls_token":
        return f"stages/{index}", "cls_token"
    head, _, leaf = rest.rpartition(".")
    if head in _STAGE_PARTS and leaf in ("weight", "bias"):
        return f"stages/{index}/{_STAGE_PARTS[head]}", leaf
    block = _BLOCK.fullmatch(rest)
    if block is None:
        return None
    layer, part, leaf = block.groups()
    prefix = f"stages/{index}/blocks/{layer}"
    if part in _BLOCK_PARTS and leaf in ("weight", "bias"):
        return f"{prefix}/{_BLOCK_PARTS[part]}", leaf
    projection = _PROJECTION.fullmatch(part)
    if projection is None:
        return None
    which, kind = projection.groups()
    if kind == "convolution" and leaf != "weight":
        return None
    return f"{prefix}/attn/conv_proj_{which[0]}/{'conv' if kind == 'convolution' else 'bn'}", leaf


def from_transformers_cvt(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """transformers `CvtForImageClassification` (or `CvtModel`) state dict -> our parameter
    paths in Flax layout ('stages/2/blocks/9/attn/conv_proj_k/bn/mean': array, ...).

    Convolution weights (O, I, kh, kw) -> kernels (kh, kw, I, O) (depthwise: (3, 3, 1, D));
    linear (O, I) -> (I, O); LayerNorm and BatchNorm weights -> scale, running_mean/var ->
    mean/var; `num_batches_tracked` is dropped. Keys of other models are refused.
    """
    params, unknown = {}, []
    for key, tensor in state_dict.items():
        if key.endswith(".num_batches_tracked"):
            continue
        found = _module_path(key)
        if found is None:
            unknown.append(key)
            continue
        module, leaf = found
        leaf, array = torch_leaf(_LEAVES.get(leaf, leaf), np.asarray(tensor, dtype=np.float32))
        params[f"{module}/{leaf}"] = np.ascontiguousarray(array)
    refuse_unknown(unknown, "CvT-13 (not a transformers CvT checkpoint?)")
    return params


# ---------------------------------------------------------------- registry

@register("cvt13")
def cvt13(*, num_classes: int, rngs: nnx.Rngs, **options: Any) -> CvT:
    """CvT-13: widths 64/192/384, heads 1/3/6, blocks 1/2/10; options dropout, drop_path, dtype."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise InvalidSetting(f"cvt13: unknown options {unknown}; valid: {', '.join(OPTIONS)}")
    return CvT(num_classes=num_classes, rngs=rngs, **options)
