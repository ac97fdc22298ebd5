"""Where the models look: Grad-CAM, spatial attention gates, attention rollout, overlays.

Images are the dataset's uint8 fused slices (N, H, W, 3); they are normalised here with the
training statistics (`steps.normalize_images`). Models are run with BatchNorm on its running
statistics and without dropout whatever mode they are in, so a batch's maps do not depend on
which other images share it. Every map comes back as float32 numpy (N, H, W) at the input size.

Grad-CAM (Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks via
Gradient-based Localization", ICCV), for a ResNet:

    A = features(x)[-1]                    layer4 output after any stage attention (N, h, w, C)
    y = logit of `target_class`            the head applied to A (its attention, pool, fc)
    w_c = (1 / hw) sum_ij dy / dA_ijc      spatial mean of the gradient, one weight per channel
    M = ReLU(sum_c w_c A_c)                (N, h, w)
    M <- bilinear(M, H x W) / max(...)     per image; a map that is zero everywhere stays zero

The head's own attention module is part of y, so its gate shapes the gradient, not A. The
upsampling is half-pixel-centred bilinear without antialiasing, torch's
`F.interpolate(mode='bilinear', align_corners=False)`. With the triple head, `head=k` takes A
from the stage head k reads (layer2, layer3, layer4 for k = 0, 1, 2) and y from that head's
logit. `head=None` takes the combined logit and A = layer4 with layer2 and layer3 held fixed:
the combined logit then depends on A only through head 2, weighted by 1/3 ('mean') or by
softmax(head_weights)_2 ('learned'), so after the normalisation it is the map of head 2.

Spatial attention gates: every CBAM spatial gate of the model,

    g = sigmoid(conv7x7([mean_c(x), max_c(x)]))   (N, h, w) in (0, 1), x the gate's input,

upsampled bilinearly to H x W and returned as they are (not renormalised), keyed by the
module's path with dots ('attention.spatial', 'stage_attention.3.spatial',
'heads.2.attention.spatial', 'layer4.1.attention' for the kind 'spatial').

Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers", ACL),
for a VisionTransformer with blocks l = 1..L and attention weights W_l (heads, T, T),
T = 1 + rows cols tokens:

    F_l = fuse_heads(W_l)                     mean (default), max or min over heads
    F_l[drop] = 0                             the discard_ratio fraction of smallest entries of
                                              F_l per image, the cls-to-cls entry always kept
    A_l = (F_l + I) / rowsum(F_l + I)         residual connection, rows renormalised
    R = A_L A_(L-1) ... A_1                   (T, T)
    M = R[0, 1:]                              pool='token': the cls token's row over patches
    M = mean_{i >= 1} R[i, 1:]                pool='avg': the classifier reads the mean of the
                                              patch tokens, so the patch-token rows are averaged
    M -> (rows, cols) grid, bilinear to H x W, divided by its max

The weights W_l are the ones each block's attention applies (softmax(q k^T / sqrt(d)), sown
by `vit.Attention` when recording).

Overlays and summaries: `overlay` blends a colour-mapped heat map over the slice and outlines
the tumour mask; `save_overlay_png` writes a row of titled panels. For a heat map M >= 0 and a
mask S,

    inside_fraction      = sum_{S} M / sum M                   (NaN if M is zero everywhere)
    concentration_ratio  = mean_{S} M / mean_{not S} M         (NaN for a zero denominator or an
                                                               empty S or not S)

an inside fraction above |S| / (H W), or a ratio above 1, means the heat favours the tumour.
"""
from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from her2jax import files
from her2jax.errors import InvalidSetting
from her2jax.models.attention import SpatialAttention
from her2jax.models.resnet import ResNet
from her2jax.models.vit import VisionTransformer
from her2jax.training.steps import normalize_images

HEAD_FUSIONS = ("mean", "max", "min")
COLORMAPS = ("jet", "inferno")
OUTLINE_COLOUR = (0, 255, 0)
PANEL_INCHES = 3.0
PANEL_DPI = 100
_HIGHEST = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------- shared helpers

def _inference_view(model: nnx.Module, record: bool = False) -> nnx.Module:
    """The model with BatchNorm on running statistics and dropout off, the caller's untouched;
    with `record`, its spatial gates and attention weights sow what they apply."""
    options = {"record": True} if record else {}
    return nnx.view(model, deterministic=True, use_running_average=True,
                    raise_if_not_found=False, **options)


def _split(model: nnx.Module, record: bool = False) -> tuple[nnx.GraphDef, nnx.State]:
    return nnx.split(_inference_view(model, record))


def _images(images: Any) -> jax.Array:
    array = jnp.asarray(images)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3), got shape {array.shape}")
    return array


def upsample(maps: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(N, h, w) -> (N, H, W) float32, half-pixel-centred bilinear (torch's align_corners=False).

    jax's antialiasing only widens the kernel when shrinking, so enlarging equals torch's
    `F.interpolate(mode='bilinear', align_corners=False, antialias=False)`.
    """
    maps = maps.astype(jnp.float32)
    if tuple(maps.shape[1:]) == tuple(size):
        return maps
    return jax.image.resize(maps, (maps.shape[0], *size), "bilinear")


def _normalise_by_max(maps: jax.Array) -> jax.Array:
    """Each (H, W) map divided by its maximum; a map whose maximum is <= 0 becomes zero."""
    peak = jnp.max(maps, axis=(1, 2), keepdims=True)
    return jnp.where(peak > 0, maps / jnp.where(peak > 0, peak, 1.0), 0.0)


def _recorded_forward(model: nnx.Module, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(logits, {dotted module path + '.' + name: value}) of a model in its recording view."""
    logits, captured = nnx.capture(lambda module, inputs: module(inputs),
                                   nnx.Intermediate)(model, x)
    values = {}
    for path, variable in nnx.to_flat_state(captured):
        recorded = variable.get_value()
        values[".".join(map(str, path))] = recorded[-1] if isinstance(recorded, tuple) else recorded
    return logits, values


def recorded_forward(model: nnx.Module, images: np.ndarray
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The model's own forward on uint8 images, in inference mode, with what its modules record:
    (logits, {'<module path>.gate': spatial gate (N, h, w), '<module path>.weights': attention
    weights (N, heads, T, T)}), all at the modules' own resolution."""
    graphdef, state = _split(model, record=True)
    return _recorded_jit(graphdef, state, _images(images))


@functools.partial(jax.jit, static_argnums=0)
def _recorded_jit(graphdef: nnx.GraphDef, state: nnx.State,
                  images: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    model = nnx.merge(graphdef, state)
    return _recorded_forward(model, normalize_images(images, _compute_dtype(model)))


def _compute_dtype(model: nnx.Module) -> jnp.dtype:
    if isinstance(model, VisionTransformer):
        return model.dtype
    return model.conv1.dtype or jnp.float32


# ---------------------------------------------------------------- Grad-CAM

def _cam_target(model: ResNet, stages: list[jax.Array], head: int | None,
                layer: int | None = None
                ) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
    """(feature map A, function A -> logits) for the chosen head or layer, the function being
    the rest of the model's own forward (`ResNet.features(a, start=k)`, `ResNet.logits`)."""
    if model.head == "single":
        if head is not None:
            raise InvalidSetting(f"head={head} asks for one of the triple head's heads, but the "
                                 "model has a single head")
        if layer is not None and layer not in (1, 2, 3, 4):
            raise InvalidSetting(f"layer must be 1, 2, 3 or 4, got {layer}")
        start = 4 if layer is None else layer
        return stages[start - 1], lambda a: model.logits([a, *model.features(a, start=start)])
    if layer is not None:
        raise InvalidSetting("layer= applies to single-head ResNets; a triple head's maps come "
                             "from each head's own stage (head=)")
    if head is None:
        fixed = [jax.lax.stop_gradient(stage) for stage in stages[:-1]]
        return stages[-1], lambda a: model.logits([*fixed, a])
    if not 0 <= head < len(model.heads):
        raise InvalidSetting(f"head must be None or 0..{len(model.heads) - 1}, got {head}")
    return stages[1:][head], model.heads[head]


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5))
def _grad_cam_jit(graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array,
                  target_class: int, head: int | None, layer: int | None) -> jax.Array:
    model = nnx.merge(graphdef, state)
    stages = model.features(normalize_images(images, _compute_dtype(model)))
    features, logits_of = _cam_target(model, stages, head, layer)

    def target(a: jax.Array) -> jax.Array:
        # Images are independent (running statistics), so the sum's gradient is per image.
        return jnp.sum(logits_of(a)[:, target_class].astype(jnp.float32))

    gradients = jax.grad(target)(features).astype(jnp.float32)
    weights = jnp.mean(gradients, axis=(1, 2))                                      # (N, C)
    cam = jnp.einsum("nhwc,nc->nhw", features.astype(jnp.float32), weights, precision=_HIGHEST)
    return jax.nn.relu(cam)


def grad_cam_features(model: ResNet, images: np.ndarray, target_class: int = 1,
                      head: int | None = None, layer: int | None = None) -> np.ndarray:
    """ReLU(sum_c w_c A_c) at the feature map's own resolution (N, h, w), not normalised.

    The first two steps of `grad_cam`; see the module docstring.
    """
    if not isinstance(model, ResNet):
        raise TypeError(f"Grad-CAM is implemented for ResNet, got {type(model).__name__}")
    graphdef, state = _split(model)
    return np.asarray(_grad_cam_jit(graphdef, state, _images(images), int(target_class),
                                    None if head is None else int(head),
                                    None if layer is None else int(layer)))


def grad_cam(model: ResNet, images: np.ndarray, target_class: int = 1,
             head: int | None = None, layer: int | None = None) -> np.ndarray:
    """Grad-CAM of the `target_class` logit on the last stage (or head `head`'s stage).

    Args:
        model: a her2jax ResNet (single or triple head).
        images: uint8 (N, H, W, 3).
        target_class: which logit to explain (1 = HER2-positive).
        head: None, or 0/1/2 for one head of a triple-head model (layer2/3/4 respectively).
        layer: None (layer4), or 1..4: A is that layer's output and y runs the later layers
            and the head from it (single head only). Small images leave layer4 a few cells
            wide (1 x 1 at 32 px), where an earlier layer still localises.

    Returns:
        float32 (N, H, W) in [0, 1], each map divided by its maximum (zero maps stay zero).
    """
    images = _images(images)
    cams = grad_cam_features(model, images, target_class, head, layer)
    return np.asarray(_normalise_by_max(upsample(jnp.asarray(cams), images.shape[1:3])))


# ---------------------------------------------------------------- spatial attention gates

def spatial_attention_paths(model: nnx.Module) -> list[str]:
    """Dotted paths of the model's SpatialAttention modules ('heads.0.attention.spatial', ...)."""
    return sorted(".".join(map(str, path)) for path, module in nnx.iter_modules(model)
                  if isinstance(module, SpatialAttention))


def spatial_attention_maps(model: nnx.Module, images: np.ndarray) -> dict[str, np.ndarray]:
    """Every CBAM spatial gate of the model, as its forward applied it, upsampled to the image
    size.

    Returns {dotted module path: float32 (N, H, W) in [0, 1]}, the gates as applied (not
    renormalised); {} for a model without SpatialAttention modules (attention 'none',
    'channel', 'danet', ViTs).
    """
    if not spatial_attention_paths(model):
        return {}
    images = _images(images)
    _, recorded = recorded_forward(model, images)
    suffix = ".gate"
    return {name[:-len(suffix)]: np.asarray(upsample(gate, images.shape[1:3]))
            for name, gate in sorted(recorded.items()) if name.endswith(suffix)}


# ---------------------------------------------------------------- attention rollout

def _discard_smallest(fused: jax.Array, ratio: float) -> jax.Array:
    """Zeroes the int(ratio T^2) smallest entries of each (T, T) map, except entry (0, 0)."""
    batch, tokens, _ = fused.shape
    count = int(tokens * tokens * ratio)
    if count == 0:
        return fused
    flat = fused.reshape(batch, -1)
    ranks = jnp.argsort(jnp.argsort(flat, axis=-1), axis=-1)
    drop = (ranks < count).at[:, 0].set(False)
    return jnp.where(drop, 0.0, flat).reshape(fused.shape)


def rollout(weights: Sequence[jax.Array], discard_ratio: float = 0.0,
            head_fusion: str = "mean") -> jax.Array:
    """R = A_L ... A_1 (N, T, T) from per-block attention weights (N, heads, T, T)."""
    fuse = {"mean": jnp.mean, "max": jnp.max, "min": jnp.min}[head_fusion]
    result = None
    for block_weights in weights:
        fused = _discard_smallest(fuse(block_weights.astype(jnp.float32), axis=1), discard_ratio)
        augmented = fused + jnp.eye(fused.shape[-1], dtype=jnp.float32)
        augmented = augmented / jnp.sum(augmented, axis=-1, keepdims=True)
        result = augmented if result is None else jnp.matmul(augmented, result,
                                                             precision=_HIGHEST)
    return result


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _rollout_jit(graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array,
                 discard_ratio: float, head_fusion: str) -> jax.Array:
    model = nnx.merge(graphdef, state)
    _, recorded = _recorded_forward(model, normalize_images(images, model.dtype))
    weights = [recorded[f"blocks.{index}.attn.weights"] for index in range(len(model.blocks))]
    flow = rollout(weights, discard_ratio, head_fusion)
    if model.pool == "token":
        patch_map = flow[:, 0, 1:]
    else:
        patch_map = jnp.mean(flow[:, 1:, 1:], axis=1)
    patch = model.patch_embed.patch_size
    patch_map = patch_map.reshape(-1, images.shape[1] // patch, images.shape[2] // patch)
    return _normalise_by_max(upsample(patch_map, images.shape[1:3]))


def attention_rollout(model: VisionTransformer, images: np.ndarray, discard_ratio: float = 0.0,
                      head_fusion: str = "mean") -> np.ndarray:
    """Attention rollout of a VisionTransformer, float32 (N, H, W) in [0, 1].

    pool='token' reads the cls token's row of the rollout; pool='avg' (no cls query feeds the
    classifier) the mean of the patch tokens' rows. See the module docstring.
    """
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"attention rollout needs a VisionTransformer, got "
                        f"{type(model).__name__}")
    if head_fusion not in HEAD_FUSIONS:
        raise InvalidSetting(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
    if not 0.0 <= discard_ratio < 1.0:
        raise InvalidSetting(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    graphdef, state = _split(model, record=True)
    return np.asarray(_rollout_jit(graphdef, state, _images(images), float(discard_ratio),
                                   head_fusion))


# ---------------------------------------------------------------- overlays

def mask_outline(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with at least one 4-neighbour outside the mask (outside the image counts as
    outside the mask), as a boolean (H, W) array."""
    mask = np.asarray(mask).astype(bool)
    padded = np.pad(mask, 1, constant_values=False)
    interior = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    return mask & ~interior


def overlay(image: np.ndarray, heatmap: np.ndarray, mask: np.ndarray | None = None,
            alpha: float = 0.45, cmap: str = "jet") -> np.ndarray:
    """uint8 (H, W, 3): (1 - alpha) image + alpha colormap(heatmap), mask outline in green.

    `heatmap` is clipped to [0, 1] (NaN counts as 0); `image` may also be (H, W) grey. The
    outline (`mask_outline`) is drawn 1 px wide in OUTLINE_COLOUR over the blend.
    """
    import matplotlib

    if cmap not in COLORMAPS:
        raise ValueError(f"cmap must be one of {COLORMAPS}, got {cmap!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    heatmap = np.asarray(heatmap, dtype=np.float64)
    if image.shape != heatmap.shape + (3,):
        raise ValueError(f"image {image.shape} and heatmap {heatmap.shape} do not match")
    heat = np.clip(np.nan_to_num(heatmap, nan=0.0), 0.0, 1.0)
    colours = matplotlib.colormaps[cmap](heat)[..., :3] * 255.0
    blended = (1.0 - alpha) * image.astype(np.float64) + alpha * colours
    out = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != heatmap.shape:
            raise ValueError(f"mask {mask.shape} and heatmap {heatmap.shape} do not match")
        out[mask_outline(mask)] = OUTLINE_COLOUR
    return out


def save_overlay_png(path: Any, panels: Sequence[tuple[str, np.ndarray]]) -> None:
    """One PNG of titled panels side by side, each PANEL_INCHES wide at PANEL_DPI.

    Panels are (title, image): uint8 (H, W, 3) shown as they are, or (H, W) shown in grey. The
    file is written through etils.epath (local paths and cloud buckets alike); parent folders
    are created.
    """
    from etils import epath
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not panels:
        raise ValueError("no panels to save")
    figure = Figure(figsize=(PANEL_INCHES * len(panels), PANEL_INCHES + 0.4), dpi=PANEL_DPI)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, picture) in zip(axes, panels):
        picture = np.asarray(picture)
        ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=PANEL_DPI)
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_bytes(path, buffer.getvalue())


# ---------------------------------------------------------------- summaries

def _map_and_mask(heatmap: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    heatmap = np.asarray(heatmap, dtype=np.float64)
    mask = np.asarray(mask).astype(bool)
    if heatmap.shape != mask.shape:
        raise ValueError(f"heatmap {heatmap.shape} and mask {mask.shape} do not match")
    if (heatmap < 0).any():
        raise ValueError("heat maps must be non-negative")
    return heatmap, mask


def inside_fraction(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """sum of the heat inside the mask / total heat; NaN when the map is zero everywhere."""
    heatmap, mask = _map_and_mask(heatmap, mask)
    total = heatmap.sum()
    return float(heatmap[mask].sum() / total) if total > 0 else math.nan


def concentration_ratio(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """mean heat inside the mask / mean heat outside; NaN when either region is empty or the
    outside mean is 0."""
    heatmap, mask = _map_and_mask(heatmap, mask)
    if mask.all() or not mask.any():
        return math.nan
    outside = heatmap[~mask].mean()
    return float(heatmap[mask].mean() / outside) if outside > 0 else math.nan
