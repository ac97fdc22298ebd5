"""Swin-T, the Swin Transformer with shifted windows (Liu et al. 2021), in timm's layout.

Patches of 4x4 pixels, embedding width 96; four stages of widths 96, 192, 384, 768, heads 3, 6,
12, 24 and 2, 2, 6, 2 blocks, on a map that halves at the start of stages 2-4:

    x = LayerNorm(conv4x4_stride4(image))            (N, H/4, W/4, 96), channels last
    x = reduction(LayerNorm(merge(x)))               stages 2-4: each 2x2 neighbourhood, 4C -> 2C
    x += DropPath(WindowAttention(norm1(x)))         per block
    x += DropPath(MLP(norm2(x)))                     MLP: C -> 4C -> C, exact GELU
    logits = head(Dropout(mean_HW(LayerNorm(x))))

`merge` concatenates the four pixels (2i, 2j), (2i+1, 2j), (2i, 2j+1), (2i+1, 2j+1) in that
order (C channels each); a map of odd height or width gets a zero row or column first.
Window attention splits the map into w x w windows (w = `window_size`, default 7), zero-padded
at the bottom and right to whole windows, and attends within each window:
softmax(q k^T / sqrt(d) + B + M) v per head, with d the head width, B the learned relative
position bias (a table of (2w-1)^2 entries per head, indexed by the row and column offsets of
query and key) and M the shift mask. Odd blocks roll the map by -w // 2 rows and columns first
(and back after), and M adds -100 between tokens of one window that came from different regions
of the rolled map (the regions are those of the padded map, as in timm). All LayerNorms use
epsilon 1e-5.

The windows follow the map the model is built for (`image_size`): where a stage's map is not
larger than the window (along a side), the window shrinks to the map and that side is not
shifted, so a 224-pixel Swin-T has no shifted windows in its last stage (a 7x7 map) and smaller
images get smaller windows and bias tables. Images of another size (any multiple of 4 pixels)
are taken with the built windows and shifts, padding and masks computed for their maps.

Stochastic depth rises linearly over all 12 blocks from 0 to `drop_path` (default 0.1), each
rate applied to both residual branches of its block; `dropout` acts on the head input.
`from_timm_swin` converts timm `SwinTransformer` weights (and the original layout, which
merges patches at the end of stages 1-3).
"""
from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from her2jax.errors import InvalidSetting
from her2jax.models.layers import Dropout
from her2jax.models.registry import register
from her2jax.models.vit import (MLP, WEIGHT_INIT, DropPath, pair, layer_norm, linear,
                                refuse_unknown, torch_leaf)

PATCH_SIZE = 4
EMBED_WIDTH = 96
DEPTHS = (2, 2, 6, 2)
HEADS = (3, 6, 12, 24)
WINDOW_SIZE = 7
MLP_RATIO = 4
LAYER_NORM_EPS = 1e-5
MASKED = -100.0
OPTIONS = ("image_size", "window_size", "dropout", "drop_path", "dtype")


def _layer_norm(width: int, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return layer_norm(width, dtype, rngs, LAYER_NORM_EPS)


# ---------------------------------------------------------------- windows

def window_partition(x: jax.Array, window: tuple[int, int]) -> jax.Array:
    """(B, H, W, C), H and W whole windows -> (B, windows, wh ww, C), windows in row-major
    order and the tokens of each window too."""
    batch, height, width, channels = x.shape
    rows, cols = height // window[0], width // window[1]
    x = x.reshape(batch, rows, window[0], cols, window[1], channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, rows * cols, -1, channels)


def window_merge(windows: jax.Array, window: tuple[int, int],
                 size: tuple[int, int]) -> jax.Array:
    """The inverse of `window_partition`: (B, windows, wh ww, C) -> (B, H, W, C)."""
    batch, _, _, channels = windows.shape
    rows, cols = size[0] // window[0], size[1] // window[1]
    x = windows.reshape(batch, rows, cols, window[0], window[1], channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, size[0], size[1], channels)


@functools.lru_cache(maxsize=None)
def relative_position_index(window: tuple[int, int]) -> np.ndarray:
    """(wh ww, wh ww) row of the bias table for each (query, key) pair of a window: the offsets
    (dr, dc) = query - key, shifted to start at 0, as dr' (2 ww - 1) + dc'."""
    rows, cols = np.meshgrid(np.arange(window[0]), np.arange(window[1]), indexing="ij")
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    d_rows = rows[:, None] - rows[None, :] + window[0] - 1
    d_cols = cols[:, None] - cols[None, :] + window[1] - 1
    return d_rows * (2 * window[1] - 1) + d_cols


@functools.lru_cache(maxsize=None)
def shift_mask(size: tuple[int, int], window: tuple[int, int],
               shift: tuple[int, int]) -> np.ndarray:
    """(windows, wh ww, wh ww) float32: 0 between tokens of the same region of the rolled and
    padded (H, W) map, -100 between tokens of different regions.

    Along each side the regions are [0, -w), [-w, -s) and [-s, end) (Python slices, so a side
    that is not shifted is one region)."""
    regions = np.zeros(size, np.float32)
    label = 0
    for row in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for col in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            regions[row[0]:row[1], col[0]:col[1]] = label
            label += 1
    labels = np.asarray(window_partition(regions[None, :, :, None], window))[0, :, :, 0]
    differ = labels[:, None, :] != labels[:, :, None]
    return np.where(differ, MASKED, 0.0).astype(np.float32)


def stage_windows(image_size: tuple[int, int], window: tuple[int, int]
                  ) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(window, shift of the odd blocks) per stage for an image of `image_size`: where the
    stage's map is not larger than the window, the window is the map and there is no shift."""
    grid = (image_size[0] // PATCH_SIZE, image_size[1] // PATCH_SIZE)
    out = []
    for index in range(len(DEPTHS)):
        if index:
            grid = ((grid[0] + 1) // 2, (grid[1] + 1) // 2)
        out.append((tuple(min(g, w) for g, w in zip(grid, window)),
                    tuple(0 if g <= w else w // 2 for g, w in zip(grid, window))))
    return out


# ---------------------------------------------------------------- modules

class PatchEmbed(nnx.Module):
    """LayerNorm(4x4 convolution, stride 4) of an NHWC image."""

    def __init__(self, width: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.proj = nnx.Conv(3, width, (PATCH_SIZE, PATCH_SIZE), strides=PATCH_SIZE,
                             padding="VALID", dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.norm = _layer_norm(width, dtype, rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.norm(self.proj(images))


class PatchMerging(nnx.Module):
    """reduction(norm(merge(x))): each 2x2 neighbourhood's 4C channels -> `width` (module
    docstring for the order)."""

    def __init__(self, in_width: int, width: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.norm = _layer_norm(4 * in_width, dtype, rngs)
        self.reduction = linear(4 * in_width, width, dtype, rngs, use_bias=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        if height % 2 or width % 2:
            x = jnp.pad(x, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)))
        rows, cols = x.shape[1] // 2, x.shape[2] // 2
        x = x.reshape(batch, rows, 2, cols, 2, channels).transpose(0, 1, 3, 4, 2, 5)
        return self.reduction(self.norm(x.reshape(batch, rows, cols, 4 * channels)))


class WindowAttention(nnx.Module):
    """softmax(q k^T / sqrt(d) + relative position bias + mask) v within each window."""

    def __init__(self, width: int, heads: int, window: tuple[int, int], *, dtype: jnp.dtype,
                 rngs: nnx.Rngs):
        self.heads = heads
        self.window = window
        self.scale = (width // heads) ** -0.5
        entries = (2 * window[0] - 1) * (2 * window[1] - 1)
        self.relative_position_bias_table = nnx.Param(WEIGHT_INIT(rngs.params(),
                                                                  (entries, heads)))
        self.qkv = linear(width, 3 * width, dtype, rngs)
        self.proj = linear(width, width, dtype, rngs)

    def __call__(self, windows: jax.Array, mask: np.ndarray | None) -> jax.Array:
        """(B, windows, tokens, C), mask (windows, tokens, tokens) or None -> the same shape."""
        batch, count, tokens, width = windows.shape
        qkv = self.qkv(windows).reshape(batch, count, tokens, 3, self.heads, width // self.heads)
        query, key, value = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
        scores = jnp.einsum("bwqhd,bwkhd->bwhqk", query, key,
                            preferred_element_type=jnp.float32) * self.scale
        index = relative_position_index(self.window)
        bias = self.relative_position_bias_table[...][index.reshape(-1)]
        scores = scores + bias.reshape(tokens, tokens, self.heads).transpose(2, 0, 1)
        if mask is not None:
            scores = scores + mask[:, None]
        weights = jax.nn.softmax(scores, axis=-1)
        mixed = jnp.einsum("bwhqk,bwkhd->bwqhd", weights.astype(value.dtype), value)
        return self.proj(mixed.reshape(batch, count, tokens, width))


class Block(nnx.Module):
    """x += DropPath(window attention(norm1 x)), shifted when `shift` is not (0, 0);
    x += DropPath(mlp(norm2 x))."""

    def __init__(self, width: int, heads: int, window: tuple[int, int], shift: tuple[int, int],
                 drop_path: float, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.window = window
        self.shift = shift
        self.norm1 = _layer_norm(width, dtype, rngs)
        self.attn = WindowAttention(width, heads, window, dtype=dtype, rngs=rngs)
        self.drop_path1 = DropPath(drop_path, rngs=rngs)
        self.norm2 = _layer_norm(width, dtype, rngs)
        self.mlp = MLP(width, MLP_RATIO * width, dtype=dtype, rngs=rngs)
        self.drop_path2 = DropPath(drop_path, rngs=rngs)

    def _attend(self, x: jax.Array) -> jax.Array:
        height, width = x.shape[1:3]
        shifted = any(self.shift)
        if shifted:
            x = jnp.roll(x, (-self.shift[0], -self.shift[1]), axis=(1, 2))
        pad_rows, pad_cols = -height % self.window[0], -width % self.window[1]
        if pad_rows or pad_cols:
            x = jnp.pad(x, ((0, 0), (0, pad_rows), (0, pad_cols), (0, 0)))
        size = (height + pad_rows, width + pad_cols)
        mask = shift_mask(size, self.window, self.shift) if shifted else None
        x = self.attn(window_partition(x, self.window), mask)
        x = window_merge(x, self.window, size)[:, :height, :width]
        if shifted:
            x = jnp.roll(x, self.shift, axis=(1, 2))
        return x

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.drop_path1(self._attend(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class Stage(nnx.Module):
    """Patch merging (stages 2-4), then blocks with unshifted and shifted windows in turn."""

    def __init__(self, index: int, in_width: int, window: tuple[int, int],
                 shift: tuple[int, int], rates: Sequence[float], *, dtype: jnp.dtype,
                 rngs: nnx.Rngs):
        width = EMBED_WIDTH * 2 ** index
        self.downsample = (PatchMerging(in_width, width, dtype=dtype, rngs=rngs) if index
                           else None)
        self.blocks = nnx.List([Block(width, HEADS[index], window, shift if block % 2 else (0, 0),
                                      float(rate), dtype=dtype, rngs=rngs)
                                for block, rate in enumerate(rates)])

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.downsample is not None:
            x = self.downsample(x)
        for block in self.blocks:
            x = block(x)
        return x


class SwinTransformer(nnx.Module):
    """Swin-T on NHWC images -> logits (batch, num_classes) in float32; see the module
    docstring."""

    def __init__(self, *, num_classes: int, image_size: int | Sequence[int] = 224,
                 window_size: int | Sequence[int] = WINDOW_SIZE, dropout: float = 0.0,
                 drop_path: float = 0.1, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if not (0.0 <= dropout < 1.0 and 0.0 <= drop_path < 1.0):
            raise InvalidSetting(f"dropout and drop_path are rates in [0, 1), got {dropout}, "
                                 f"{drop_path}")
        image, window = pair(image_size), pair(window_size)
        if min(image) < PATCH_SIZE or any(side % PATCH_SIZE for side in image):
            raise InvalidSetting(f"image_size {image_size} is not a positive multiple of "
                                 f"{PATCH_SIZE}")
        if min(window) < 1:
            raise InvalidSetting(f"window_size must be at least 1, got {window_size}")
        self.dtype = jnp.dtype(dtype)
        self.patch_embed = PatchEmbed(EMBED_WIDTH, dtype=self.dtype, rngs=rngs)
        rates = np.split(np.linspace(0.0, drop_path, sum(DEPTHS)), np.cumsum(DEPTHS)[:-1])
        stages, in_width = [], EMBED_WIDTH
        for index, (stage_window, shift) in enumerate(stage_windows(image, window)):
            stages.append(Stage(index, in_width, stage_window, shift, rates[index],
                                dtype=self.dtype, rngs=rngs))
            in_width = EMBED_WIDTH * 2 ** index
        self.stages = nnx.List(stages)
        self.norm = _layer_norm(in_width, self.dtype, rngs)
        self.head_drop = Dropout(dropout, rngs=rngs)
        self.head = linear(in_width, num_classes, self.dtype, rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        height, width = images.shape[1:3]
        if min(height, width) < PATCH_SIZE or height % PATCH_SIZE or width % PATCH_SIZE:
            raise InvalidSetting(f"image {height}x{width} is not a whole number of "
                                 f"{PATCH_SIZE}-pixel patches; crop or resize it")
        x = self.patch_embed(images.astype(self.dtype))
        for stage in self.stages:
            x = stage(x)
        pooled = self.norm(x).mean(axis=(1, 2), dtype=jnp.float32)
        return self.head(self.head_drop(pooled)).astype(jnp.float32)


# ---------------------------------------------------------------- weights

_BLOCK_PARTS = "norm1|norm2|attn\\.qkv|attn\\.proj|mlp\\.fc1|mlp\\.fc2"
_KEYS = [
    (re.compile(r"patch_embed\.(proj|norm)\.(weight|bias)"), "patch_embed/{0}/{1}"),
    (re.compile(r"layers\.(\d+)\.downsample\.(norm\.weight|norm\.bias|reduction\.weight)"),
     "stages/{0}/downsample/{1}"),
    (re.compile(rf"layers\.(\d+)\.blocks\.(\d+)\.({_BLOCK_PARTS})\.(weight|bias)"),
     "stages/{0}/blocks/{1}/{2}/{3}"),
    (re.compile(r"layers\.(\d+)\.blocks\.(\d+)\.attn\.(relative_position_bias_table)"),
     "stages/{0}/blocks/{1}/attn/{2}"),
    (re.compile(r"norm\.(weight|bias)"), "norm/{0}"),
    (re.compile(r"head(?:\.fc)?\.(weight|bias)"), "head/{0}"),
]
_BUFFERS = re.compile(r"layers\.\d+\.blocks\.\d+\.(attn\.relative_position_index|attn_mask)")


def from_timm_swin(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """timm `SwinTransformer` state dict -> our parameter paths in Flax layout
    ('stages/2/blocks/5/attn/relative_position_bias_table': array, ...).

    Convolution weights (O, I, kh, kw) -> kernels (kh, kw, I, O); linear (O, I) -> (I, O);
    LayerNorm weights -> scale; relative position bias tables are copied as they are. The
    buffers `relative_position_index` and `attn_mask` are dropped (computed, not learned).
    Checkpoints in the original layout (patch merging at the end of stages 1-3,
    `layers.0.downsample`, and `head.weight`) are read too. Keys of other models are refused.
    """
    merge_at_end = any(key.startswith("layers.0.downsample.") for key in state_dict)
    params, unknown = {}, []
    for key, tensor in state_dict.items():
        if _BUFFERS.fullmatch(key):
            continue
        for pattern, template in _KEYS:
            match = pattern.fullmatch(key)
            if match:
                parts = list(match.groups())
                if merge_at_end and ".downsample." in key:
                    parts[0] = str(int(parts[0]) + 1)
                path = template.format(*parts).replace(".", "/")
                break
        else:
            unknown.append(key)
            continue
        module, _, leaf = path.rpartition("/")
        leaf, array = torch_leaf(leaf, np.asarray(tensor, dtype=np.float32))
        params[f"{module}/{leaf}"] = np.ascontiguousarray(array)
    refuse_unknown(unknown, "Swin-T (not a timm Swin checkpoint?)")
    return params


# ---------------------------------------------------------------- registry

@register("swin_tiny_patch4_window7")
def swin_tiny_patch4_window7(*, num_classes: int, rngs: nnx.Rngs,
                             **options: Any) -> SwinTransformer:
    """Swin-T: widths 96-768, heads 3/6/12/24, blocks 2/2/6/2, 4-pixel patches, 7x7 windows;
    options image_size, window_size, dropout, drop_path, dtype."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise InvalidSetting(f"swin_tiny_patch4_window7: unknown options {unknown}; valid: "
                             f"{', '.join(OPTIONS)}")
    return SwinTransformer(num_classes=num_classes, rngs=rngs, **options)
