"""Vision Transformers (ViT-Ti/S/B, 16- or 32-pixel patches) with timm's parameter layout.

    tokens = [cls; patches(x) W_patch + b] + pos_embed                 (N, 1 + H W / p^2, D)
    tokens += DropPath(Attention(LayerNorm1(tokens)))                  pre-norm, 12 blocks
    tokens += DropPath(MLP(LayerNorm2(tokens)))                        MLP: D -> 4D -> D, exact GELU
    logits = head(Dropout(LayerNorm(tokens)[:, 0]))                    pool='token'
    logits = head(Dropout(LayerNorm(mean(tokens[:, 1:]))))            pool='avg' (timm's fc_norm)

Parameter names follow timm's `VisionTransformer`, so `from_timm` converts its weights one to
one. When the input grid differs from the grid the model was built for, the position
embeddings are resampled the way timm does (antialiased bicubic, class-token entry kept).

`attention_kernel` picks how softmax(q k^T / sqrt(d)) v is computed, not what: 'auto' (default)
is 'cudnn' where cuDNN can run (an NVIDIA GPU, bfloat16 or float16 compute) and 'xla' elsewhere,
silently; 'xla' writes it out (scores and softmax in float32); 'cudnn' calls
`jax.nn.dot_product_attention(implementation='cudnn')`, the fused kernel on NVIDIA GPUs (the
counterpart of the `scaled_dot_product_attention` timm uses in PyTorch; 1.37x the training
throughput of 'xla' for ViT-B/16 on an H200, benchmarks/RESULTS.md). Where an explicit 'cudnn'
cannot run (another backend, float32 compute: evaluating on a CPU a run trained on a GPU, say)
the model warns once and uses 'xla', so the choice never changes which checkpoints or machines
a model works with.
"""
from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from her2jax.errors import BadInput, InvalidSetting
from her2jax.models.layers import Dropout
from her2jax.models.registry import register

DEPTH = 12
MLP_RATIO = 4
LAYER_NORM_EPS = 1e-6
SIZES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}   # name: (width, heads)
POOLS = ("token", "avg")
OPTIONS = ("image_size", "pool", "dropout", "drop_path", "dtype", "depth", "attention_kernel")
ATTENTION_KERNELS = ("auto", "xla", "cudnn")
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
WEIGHT_INIT = nnx.initializers.truncated_normal(stddev=0.02)


def pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def linear(features_in: int, features_out: int, dtype: jnp.dtype, rngs: nnx.Rngs,
           use_bias: bool = True) -> nnx.Linear:
    """A transformer's linear layer: float32 parameters, truncated-normal kernels (ViT, CvT,
    Swin)."""
    return nnx.Linear(features_in, features_out, use_bias=use_bias, kernel_init=WEIGHT_INIT,
                      dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def layer_norm(width: int, dtype: jnp.dtype, rngs: nnx.Rngs,
               epsilon: float = LAYER_NORM_EPS) -> nnx.LayerNorm:
    # flax computes the mean and variance in at least float32 whatever `dtype` is.
    return nnx.LayerNorm(width, epsilon=epsilon, dtype=dtype, param_dtype=jnp.float32,
                         rngs=rngs)


def torch_leaf(leaf: str, array: np.ndarray) -> tuple[str, np.ndarray]:
    """A PyTorch parameter -> our leaf name and layout: conv weight (O, I, kh, kw) -> kernel
    (kh, kw, I, O); linear weight (O, I) -> kernel (I, O); a norm's weight -> scale; anything
    else kept."""
    if leaf == "weight" and array.ndim == 4:
        return "kernel", array.transpose(2, 3, 1, 0)
    if leaf == "weight" and array.ndim == 2:
        return "kernel", array.T
    return ("scale" if leaf == "weight" else leaf), array


def refuse_unknown(unknown: Sequence[str], what: str) -> None:
    """BadInput naming the first checkpoint keys that have no counterpart in `what`."""
    if unknown:
        shown = ", ".join(sorted(unknown)[:5]) + (f", ... (+{len(unknown) - 5})"
                                                  if len(unknown) > 5 else "")
        raise BadInput(f"{len(unknown)} keys with no counterpart in {what}: {shown}")


class DropPath(nnx.Module):
    """Stochastic depth: y = x * b / (1 - rate), b ~ Bernoulli(1 - rate) once per sample.

    Identity when `deterministic` (set by `model.eval()`) or when rate is 0.
    """

    def __init__(self, rate: float, *, rngs: nnx.Rngs, deterministic: bool = False):
        self.rate = rate
        self.deterministic = deterministic
        self.rngs = rngs["dropout"].fork()

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        kept = jax.random.bernoulli(self.rngs(), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(kept, x / keep, 0).astype(x.dtype)

    def set_view(self, deterministic: bool | None = None) -> None:
        """Lets `nnx.view(model, deterministic=...)` switch it like `nnx.Dropout`."""
        if deterministic is not None:
            self.deterministic = deterministic


class Attention(nnx.Module):
    """Multi-head self-attention: softmax(q k^T / sqrt(D / heads)) v per head, then `proj`.

    q, k and v come from one `qkv` projection D -> 3D laid out (3, heads, D / heads) as timm's.
    """

    def __init__(self, width: int, heads: int, *, dtype: jnp.dtype, rngs: nnx.Rngs,
                 attention_kernel: str = "auto"):
        self.heads = heads
        self.attention_kernel = attention_kernel
        self.qkv = linear(width, 3 * width, dtype, rngs)
        self.proj = linear(width, width, dtype, rngs)
        self.record = False

    def set_view(self, record: bool | None = None) -> None:
        """record: if True, each call runs the written-out kernel and sows its softmax weights
        (batch, heads, T, T) in float32 as the `nnx.Intermediate` 'weights', to be read with
        `nnx.capture` (attention rollout does)."""
        if record is not None:
            self.record = record

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, tokens, width = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, width // self.heads)
        query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if not self.record and self.attention_kernel != "xla" and cudnn_attention_usable(
                query.dtype, warn=self.attention_kernel == "cudnn"):
            mixed = cudnn_attention(query, key, value, 1.0 / math.sqrt(width // self.heads))
        else:
            scores = jnp.einsum("bqhd,bkhd->bhqk", query, key,
                                preferred_element_type=jnp.float32)
            weights = jax.nn.softmax(scores / math.sqrt(width // self.heads), axis=-1)
            if self.record:
                self.sow(nnx.Intermediate, "weights", weights)
            mixed = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(x.dtype), value)
        return self.proj(mixed.reshape(batch, tokens, width))


# Token counts are padded to a multiple of this for cuDNN: its training kernels are refused for
# odd lengths by jax 0.11 (a ViT has 1 + grid tokens: 197 at 224 px with 16-pixel patches).
CUDNN_TOKEN_MULTIPLE = 2


def cudnn_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                    scale: float) -> jax.Array:
    """softmax(q k^T scale) v by cuDNN's fused kernel on (batch, tokens, heads, head width).

    Where the token count is not a multiple of CUDNN_TOKEN_MULTIPLE, q, k and v get zero tokens
    appended and cuDNN is told each sequence's true length, so the padding keys get no weight;
    the padding queries' rows are dropped: the same function as without padding.
    """
    batch, tokens = query.shape[:2]
    padded = -(-tokens // CUDNN_TOKEN_MULTIPLE) * CUDNN_TOKEN_MULTIPLE
    if padded == tokens:
        return jax.nn.dot_product_attention(query, key, value, scale=scale,
                                            implementation="cudnn")
    widths = ((0, 0), (0, padded - tokens), (0, 0), (0, 0))
    query, key, value = (jnp.pad(x, widths) for x in (query, key, value))
    lengths = jnp.full((batch,), tokens, jnp.int32)
    mixed = jax.nn.dot_product_attention(query, key, value, scale=scale,
                                         query_seq_lengths=lengths,
                                         key_value_seq_lengths=lengths,
                                         implementation="cudnn")
    return mixed[:, :tokens]


_warned_cudnn: set[str] = set()


def cudnn_attention_usable(dtype: Any, warn: bool = True) -> bool:
    """Whether cuDNN's fused attention can run here; with `warn`, warns once (per reason) when
    not."""
    device = jax.devices()[0]
    if device.platform != "gpu" or "nvidia" not in device.device_kind.lower():
        reason = f"JAX's device is {device.platform} ({device.device_kind}), not an NVIDIA GPU"
    elif jnp.dtype(dtype) not in [jnp.dtype(d) for d in CUDNN_DTYPES]:
        reason = f"compute dtype {jnp.dtype(dtype).name} (cuDNN attention needs bfloat16/float16)"
    else:
        return True
    if warn and reason not in _warned_cudnn:
        _warned_cudnn.add(reason)
        warnings.warn(f"attention_kernel='cudnn': {reason}; using 'xla' (same function)",
                      stacklevel=3)
    return False


class MLP(nnx.Module):
    """fc2(GELU(fc1(x))), GELU(z) = z Phi(z) with the exact (erf) normal CDF Phi."""

    def __init__(self, width: int, hidden: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.fc1 = linear(width, hidden, dtype, rngs)
        self.fc2 = linear(hidden, width, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class Block(nnx.Module):
    """Pre-norm transformer block: x += DropPath(attn(norm1 x)); x += DropPath(mlp(norm2 x))."""

    def __init__(self, width: int, heads: int, drop_path: float, *, dtype: jnp.dtype,
                 rngs: nnx.Rngs, attention_kernel: str = "auto"):
        self.norm1 = layer_norm(width, dtype, rngs)
        self.attn = Attention(width, heads, dtype=dtype, rngs=rngs,
                              attention_kernel=attention_kernel)
        self.drop_path1 = DropPath(drop_path, rngs=rngs)
        self.norm2 = layer_norm(width, dtype, rngs)
        self.mlp = MLP(width, MLP_RATIO * width, dtype=dtype, rngs=rngs)
        self.drop_path2 = DropPath(drop_path, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class PatchEmbed(nnx.Module):
    """Non-overlapping p x p patches projected to D channels: a p x p convolution, stride p."""

    def __init__(self, patch_size: int, width: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.patch_size = patch_size
        self.proj = nnx.Conv(3, width, kernel_size=(patch_size, patch_size),
                             strides=(patch_size, patch_size), padding="VALID", dtype=dtype,
                             param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        height, width = images.shape[1:3]
        if height % self.patch_size or width % self.patch_size:
            raise InvalidSetting(f"image {height}x{width} is not a whole number of "
                                 f"{self.patch_size}-pixel patches; crop or resize it")
        return self.proj(images)


class VisionTransformer(nnx.Module):
    """ViT on NHWC images -> logits (batch, num_classes) in float32; see the module docstring.

    `dropout` acts on the head input (timm's drop_rate); stochastic-depth rates rise linearly
    from 0 in the first block to `drop_path` in the last (timm's rule).
    """

    def __init__(self, *, num_classes: int, width: int, heads: int, patch_size: int,
                 depth: int = DEPTH, image_size: int | Sequence[int] = 224,
                 pool: str = "token", dropout: float = 0.0, drop_path: float = 0.0,
                 dtype: Any = jnp.float32, attention_kernel: str = "auto", rngs: nnx.Rngs):
        if pool not in POOLS:
            raise InvalidSetting(f"pool must be one of {POOLS}, got {pool!r}")
        if attention_kernel not in ATTENTION_KERNELS:
            raise InvalidSetting(f"attention_kernel must be one of {ATTENTION_KERNELS}, got "
                                 f"{attention_kernel!r}")
        if not (0.0 <= dropout < 1.0 and 0.0 <= drop_path < 1.0):
            raise InvalidSetting(f"dropout and drop_path are rates in [0, 1), got {dropout}, "
                                 f"{drop_path}")
        image_height, image_width = pair(image_size)
        if image_height % patch_size or image_width % patch_size:
            raise InvalidSetting(f"image_size {image_size} is not a multiple of {patch_size}")
        self.dtype = jnp.dtype(dtype)
        self.pool = pool
        self.grid = (image_height // patch_size, image_width // patch_size)
        self.patch_embed = PatchEmbed(patch_size, width, dtype=self.dtype, rngs=rngs)
        self.cls_token = nnx.Param(nnx.initializers.normal(1e-6)(rngs.params(), (1, 1, width)))
        tokens = 1 + self.grid[0] * self.grid[1]
        self.pos_embed = nnx.Param(WEIGHT_INIT(rngs.params(), (1, tokens, width)))
        rates = np.linspace(0.0, drop_path, depth)
        self.blocks = nnx.List([Block(width, heads, float(rate), dtype=self.dtype, rngs=rngs,
                                      attention_kernel=attention_kernel)
                                for rate in rates])
        if pool == "token":
            self.norm = layer_norm(width, self.dtype, rngs)
        else:
            self.fc_norm = layer_norm(width, self.dtype, rngs)
        self.head_drop = Dropout(dropout, rngs=rngs)
        self.head = linear(width, num_classes, self.dtype, rngs)

    def position_embedding(self, grid: tuple[int, int]) -> jax.Array:
        """pos_embed for a (rows, cols) patch grid, resampled if it is not the built grid."""
        if grid == self.grid:
            return self.pos_embed[...]
        return _resample(self.pos_embed[...], self.grid, grid, 1, jnp)

    def __call__(self, images: jax.Array) -> jax.Array:
        patches = self.patch_embed(images.astype(self.dtype))
        batch, rows, cols, width = patches.shape
        cls = jnp.broadcast_to(self.cls_token[...].astype(self.dtype), (batch, 1, width))
        tokens = jnp.concatenate([cls, patches.reshape(batch, rows * cols, width)], axis=1)
        tokens = tokens + self.position_embedding((rows, cols)).astype(self.dtype)
        for block in self.blocks:
            tokens = block(tokens)
        if self.pool == "token":
            pooled = self.norm(tokens)[:, 0]
        else:
            pooled = self.fc_norm(tokens[:, 1:].mean(axis=1, dtype=jnp.float32))
        return self.head(self.head_drop(pooled)).astype(jnp.float32)


# ---------------------------------------------------------------- position-embedding resampling

def _cubic(distance: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Keys' cubic kernel: (a+2)|t|^3 - (a+3)|t|^2 + 1 for |t| < 1,
    a(|t|^3 - 5|t|^2 + 8|t| - 4) for 1 <= |t| < 2, else 0 (a = -0.5, as PIL and torch's
    antialiased bicubic)."""
    t = np.abs(distance)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = a * (((t - 5) * t + 8) * t - 4)
    return np.where(t < 1, near, np.where(t < 2, far, 0.0))


def resample_matrix(old: int, new: int) -> np.ndarray:
    """(new, old) weights of antialiased bicubic resampling along one axis.

    Output i sits at c_i = (i + 1/2) old / new in input pixel units; w_ij ∝ k((j + 1/2 - c_i) / s)
    with s = max(old / new, 1) (the kernel widens when shrinking), normalised so each row sums
    to 1. When enlarging, linear ramps are reproduced exactly wherever the kernel's four taps
    lie inside the grid; at the border the dropped taps are renormalised away (as PIL and timm).
    """
    scale = old / new
    centres = (np.arange(new) + 0.5) * scale
    weights = _cubic((np.arange(old)[None, :] + 0.5 - centres[:, None]) / max(scale, 1.0))
    return weights / weights.sum(axis=1, keepdims=True)


def _resample(pos_embed: Any, old_grid: tuple[int, int], new_grid: tuple[int, int],
              num_prefix_tokens: int, xp: Any) -> Any:
    """Resamples the grid part of a (1, prefix + rows cols, D) embedding with numpy or jax."""
    width = pos_embed.shape[-1]
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    grid = grid.reshape(*old_grid, width)
    rows = resample_matrix(old_grid[0], new_grid[0]).astype(np.float32)
    cols = resample_matrix(old_grid[1], new_grid[1]).astype(np.float32)
    extra = {"precision": jax.lax.Precision.HIGHEST} if xp is jnp else {}
    resized = xp.einsum("rR,cC,RCd->rcd", rows, cols, grid, **extra)
    return xp.concatenate([prefix, resized.reshape(1, -1, width).astype(grid.dtype)], axis=1)


def resize_pos_embed(pos_embed: np.ndarray, new_grid: tuple[int, int],
                     num_prefix_tokens: int = 1) -> np.ndarray:
    """(1, prefix + g^2, D) -> (1, prefix + rows cols, D) for a square source grid g x g;
    prefix (class-token) entries are copied, the grid is resampled by `resample_matrix`."""
    pos_embed = np.asarray(pos_embed)
    side = math.isqrt(pos_embed.shape[1] - num_prefix_tokens)
    if side * side != pos_embed.shape[1] - num_prefix_tokens:
        raise BadInput(f"{pos_embed.shape[1] - num_prefix_tokens} grid tokens are not a square")
    new_grid = pair(new_grid)
    if new_grid == (side, side):
        return pos_embed.copy()
    return _resample(pos_embed, (side, side), new_grid, num_prefix_tokens, np)


# ---------------------------------------------------------------- weights

_TIMM_KEY = re.compile(r"(patch_embed\.proj|blocks\.\d+\.(norm[12]|attn\.(qkv|proj)|mlp\.fc[12])"
                       r"|norm|fc_norm|head)\.(weight|bias)|cls_token|pos_embed")


def from_timm(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """timm VisionTransformer state dict -> {'blocks/0/attn/qkv/kernel': array, ...}.

    Convolution weights (O, I, kh, kw) -> kernels (kh, kw, I, O); linear (O, I) -> (I, O);
    LayerNorm weight -> scale. Keys of other timm variants (register tokens, layer scale, ...)
    are refused.
    """
    unknown = sorted(key for key in state_dict if not _TIMM_KEY.fullmatch(key))
    if unknown:
        raise BadInput(f"timm keys with no counterpart in this ViT: {unknown}")
    params = {}
    for key, tensor in state_dict.items():
        *module, leaf = key.split(".")
        leaf, array = torch_leaf(leaf, np.asarray(tensor, dtype=np.float32))
        params["/".join([*module, leaf])] = np.ascontiguousarray(array)
    return params


# ---------------------------------------------------------------- registry

def _variant(size: str, patch_size: int, num_classes: int, rngs: nnx.Rngs,
             options: Mapping[str, Any]) -> VisionTransformer:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise InvalidSetting(f"vit_{size}_patch{patch_size}: unknown options {unknown}; "
                             f"valid: {', '.join(OPTIONS)}")
    width, heads = SIZES[size]
    return VisionTransformer(num_classes=num_classes, width=width, heads=heads,
                             patch_size=patch_size, rngs=rngs, **options)


@register("vit_tiny_patch4")
def vit_tiny_patch4(*, num_classes: int, rngs: nnx.Rngs, **options: Any) -> VisionTransformer:
    """ViT-Ti/4: width 192, 3 heads, 4-pixel patches, for small images (32-64 px crops)."""
    return _variant("tiny", 4, num_classes, rngs, options)


@register("vit_tiny_patch16")
def vit_tiny_patch16(*, num_classes: int, rngs: nnx.Rngs, **options: Any) -> VisionTransformer:
    """ViT-Ti/16: width 192, 3 heads, 16-pixel patches."""
    return _variant("tiny", 16, num_classes, rngs, options)


@register("vit_small_patch16")
def vit_small_patch16(*, num_classes: int, rngs: nnx.Rngs, **options: Any) -> VisionTransformer:
    """ViT-S/16: width 384, 6 heads, 16-pixel patches."""
    return _variant("small", 16, num_classes, rngs, options)


@register("vit_base_patch16")
def vit_base_patch16(*, num_classes: int, rngs: nnx.Rngs, **options: Any) -> VisionTransformer:
    """ViT-B/16: width 768, 12 heads, 16-pixel patches."""
    return _variant("base", 16, num_classes, rngs, options)


@register("vit_tiny_patch32")
def vit_tiny_patch32(*, num_classes: int, rngs: nnx.Rngs, **options: Any) -> VisionTransformer:
    """ViT-Ti/32: width 192, 3 heads, 32-pixel patches."""
    return _variant("tiny", 32, num_classes, rngs, options)


@register("vit_small_patch32")
def vit_small_patch32(*, num_classes: int, rngs: nnx.Rngs, **options: Any) -> VisionTransformer:
    """ViT-S/32: width 384, 6 heads, 32-pixel patches."""
    return _variant("small", 32, num_classes, rngs, options)


@register("vit_base_patch32")
def vit_base_patch32(*, num_classes: int, rngs: nnx.Rngs, **options: Any) -> VisionTransformer:
    """ViT-B/32: width 768, 12 heads, 32-pixel patches."""
    return _variant("base", 32, num_classes, rngs, options)
