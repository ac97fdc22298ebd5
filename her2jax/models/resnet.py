"""ResNet-18/34/50/101 in torchvision's layout, with optional attention and one or three heads.

Images are (N, H, W, 3), outputs float32 logits (N, num_classes). Attribute names mirror
torchvision (`conv1`, `bn1`, `layer1`..`layer4` of blocks with `conv1, bn1, conv2, bn2[, conv3,
bn3]` and `downsample.conv/bn`, `fc`), so `from_torchvision` maps an ImageNet state dict one to
one. With attention 'none', the single head and dropout 0 the network computes torchvision's
function (bottleneck stride on the 3x3 convolution, v1.5). One difference in training: the
running variance is updated with the biased batch variance, torch uses the unbiased one. On the
CPU, 1x1 convolutions and the stem's max pool take the forms of `layers.py` (same function).

Attention (see `attention.py`) goes where `placement` says:
    last    one module on the layer4 output, attribute `attention`
    stages  one after each of the four stages, attribute `stage_attention`
    blocks  in every residual block on the residual branch before the addition (SE-/CBAM-ResNet),
            block attribute `attention`
Places not chosen hold `Identity`, which has no parameters.

Heads: `single` is global average pool -> dropout -> `fc`. `triple` is this project's
interpretation of the study's unpublished "triple head": three heads (`heads`) on the layer2,
layer3 and layer4 outputs, each pool -> dropout -> linear; with placement 'last' each head has its
own attention module on its input instead of one shared `attention`. Their logits are combined by
`head_combine`: 'mean', or 'learned' = sum_k softmax(head_weights)_k logits_k with
`head_weights` starting at 0 (the mean).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from her2jax.errors import InvalidSetting
from her2jax.models.attention import KINDS, Identity, make_attention
from her2jax.models.layers import Dropout, conv_general_dilated, max_pool
from her2jax.models.presets import DUAL_ATTENTION, TRIPLE_HEAD
from her2jax.models.registry import register

PLACEMENTS = ("last", "stages", "blocks")
HEADS = ("single", "triple")
HEAD_COMBINES = ("mean", "learned")
WIDTHS = (64, 128, 256, 512)
# torchvision initialises convolutions with kaiming_normal_(mode="fan_out", nonlinearity="relu").
CONV_INIT = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(in_channels: int, out_channels: int, size: int, stride: int = 1, *, rngs: nnx.Rngs,
         dtype: jnp.dtype) -> nnx.Conv:
    """Bias-free convolution with torch's symmetric zero padding size // 2.

    1x1 convolutions run as matrix products on the CPU (`layers.conv_general_dilated`).
    """
    pad = size // 2
    return nnx.Conv(in_channels, out_channels, (size, size), strides=stride,
                    padding=((pad, pad), (pad, pad)), use_bias=False, kernel_init=CONV_INIT,
                    dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
                    conv_general_dilated=conv_general_dilated)


def batch_norm(features: int, *, rngs: nnx.Rngs, dtype: jnp.dtype) -> nnx.BatchNorm:
    """torch BatchNorm2d: epsilon 1e-5, running = 0.9 running + 0.1 batch (torch momentum 0.1).

    The batch variance is mean((x - mean(x))^2), not mean(x^2) - mean(x)^2, which cancels
    digits when the mean is large against the spread.
    """
    return nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, use_fast_variance=False,
                         dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


class Downsample(nnx.Module):
    """Shortcut projection: bn(conv1x1_stride(x)), torch `downsample.0` / `downsample.1`."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, *, rngs: nnx.Rngs,
                 dtype: jnp.dtype):
        self.conv = conv(in_channels, out_channels, 1, stride, rngs=rngs, dtype=dtype)
        self.bn = batch_norm(out_channels, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.bn(self.conv(x))


def shortcut(in_channels: int, out_channels: int, stride: int, *, rngs: nnx.Rngs,
             dtype: jnp.dtype) -> Downsample | None:
    if stride == 1 and in_channels == out_channels:
        return None
    return Downsample(in_channels, out_channels, stride, rngs=rngs, dtype=dtype)


class BasicBlock(nnx.Module):
    """y = relu(a(bn2(conv3x3(relu(bn1(conv3x3_stride(x)))))) + shortcut(x)), a = attention."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int, *, attention: str,
                 reduction: int, rngs: nnx.Rngs, dtype: jnp.dtype):
        self.conv1 = conv(in_channels, planes, 3, stride, rngs=rngs, dtype=dtype)
        self.bn1 = batch_norm(planes, rngs=rngs, dtype=dtype)
        self.conv2 = conv(planes, planes, 3, rngs=rngs, dtype=dtype)
        self.bn2 = batch_norm(planes, rngs=rngs, dtype=dtype)
        self.attention = make_attention(attention, planes, reduction=reduction, rngs=rngs,
                                        dtype=dtype)
        self.downsample = shortcut(in_channels, planes, stride, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        out = jax.nn.relu(self.bn1(self.conv1(x)))
        out = self.attention(self.bn2(self.conv2(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return jax.nn.relu(out + identity)


class Bottleneck(nnx.Module):
    """y = relu(a(bn3(conv1x1(relu(bn2(conv3x3_stride(relu(bn1(conv1x1(x))))))))) + shortcut(x)).

    Width 4 * planes out; the stride sits on the 3x3 convolution (torchvision v1.5).
    """

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int, *, attention: str,
                 reduction: int, rngs: nnx.Rngs, dtype: jnp.dtype):
        out_channels = planes * self.expansion
        self.conv1 = conv(in_channels, planes, 1, rngs=rngs, dtype=dtype)
        self.bn1 = batch_norm(planes, rngs=rngs, dtype=dtype)
        self.conv2 = conv(planes, planes, 3, stride, rngs=rngs, dtype=dtype)
        self.bn2 = batch_norm(planes, rngs=rngs, dtype=dtype)
        self.conv3 = conv(planes, out_channels, 1, rngs=rngs, dtype=dtype)
        self.bn3 = batch_norm(out_channels, rngs=rngs, dtype=dtype)
        self.attention = make_attention(attention, out_channels, reduction=reduction, rngs=rngs,
                                        dtype=dtype)
        self.downsample = shortcut(in_channels, out_channels, stride, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        out = jax.nn.relu(self.bn1(self.conv1(x)))
        out = jax.nn.relu(self.bn2(self.conv2(out)))
        out = self.attention(self.bn3(self.conv3(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return jax.nn.relu(out + identity)


ARCHITECTURES: dict[int, tuple[type[BasicBlock | Bottleneck], tuple[int, ...]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}


def classify(x: jax.Array, attention: nnx.Module, dropout: nnx.Dropout,
             fc: nnx.Linear) -> jax.Array:
    """logits = fc(dropout(mean_hw(attention(x))))."""
    return fc(dropout(jnp.mean(attention(x), axis=(1, 2))))


class Head(nnx.Module):
    """One head of the triple head: logits = fc(dropout(mean_hw(attention(x))))."""

    def __init__(self, channels: int, num_classes: int, *, attention: str, reduction: int,
                 dropout: float, rngs: nnx.Rngs, dtype: jnp.dtype):
        self.attention = make_attention(attention, channels, reduction=reduction, rngs=rngs,
                                        dtype=dtype)
        self.dropout = Dropout(dropout, rngs=rngs)
        self.fc = nnx.Linear(channels, num_classes, dtype=dtype, param_dtype=jnp.float32,
                             rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return classify(x, self.attention, self.dropout, self.fc)


def make_layers(block: type[BasicBlock | Bottleneck], counts: tuple[int, ...], *, attention: str,
                reduction: int, rngs: nnx.Rngs, dtype: jnp.dtype) -> list[nnx.List]:
    """layer1..layer4: `counts` blocks of widths WIDTHS; layers 2-4 start with stride 2."""
    in_channels, layers = 64, []
    for stage, (planes, count) in enumerate(zip(WIDTHS, counts)):
        blocks = []
        for index in range(count):
            stride = 2 if stage > 0 and index == 0 else 1
            blocks.append(block(in_channels, planes, stride, attention=attention,
                                reduction=reduction, rngs=rngs, dtype=dtype))
            in_channels = planes * block.expansion
        layers.append(nnx.List(blocks))
    return layers


def _check(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InvalidSetting(f"unknown {name} {value!r}; choose from {', '.join(choices)}")


class ResNet(nnx.Module):
    """ResNet of `depth` 18, 34, 50 or 101; the options are described in the module docstring."""

    def __init__(self, depth: int, *, num_classes: int, rngs: nnx.Rngs, attention: str = "none",
                 placement: str = "last", reduction: int = 16, head: str = "single",
                 head_combine: str = "mean", dropout: float = 0.5,
                 dtype: jnp.dtype = jnp.float32):
        if depth not in ARCHITECTURES:
            raise InvalidSetting(f"unknown depth {depth}; choose from {sorted(ARCHITECTURES)}")
        _check("attention", attention, KINDS)
        _check("placement", placement, PLACEMENTS)
        _check("head", head, HEADS)
        _check("head_combine", head_combine, HEAD_COMBINES)
        block, counts = ARCHITECTURES[depth]

        def attention_at(where: str, channels: int) -> nnx.Module:
            if where != placement:
                return Identity()
            return make_attention(attention, channels, reduction=reduction, rngs=rngs, dtype=dtype)

        self.conv1 = conv(3, 64, 7, 2, rngs=rngs, dtype=dtype)
        self.bn1 = batch_norm(64, rngs=rngs, dtype=dtype)
        self.layer1, self.layer2, self.layer3, self.layer4 = make_layers(
            block, counts, attention=attention if placement == "blocks" else "none",
            reduction=reduction, rngs=rngs, dtype=dtype)
        channels = [planes * block.expansion for planes in WIDTHS]
        self.stage_attention = nnx.List([attention_at("stages", c) for c in channels])

        self.head = head
        self.head_combine = head_combine
        if head == "single":
            self.attention = attention_at("last", channels[-1])
            self.dropout = Dropout(dropout, rngs=rngs)
            self.fc = nnx.Linear(channels[-1], num_classes, dtype=dtype,
                                 param_dtype=jnp.float32, rngs=rngs)
            return
        head_attention = attention if placement == "last" else "none"
        self.heads = nnx.List([
            Head(c, num_classes, attention=head_attention, reduction=reduction, dropout=dropout,
                 rngs=rngs, dtype=dtype) for c in channels[1:]])
        self.head_weights = (nnx.Param(jnp.zeros((len(self.heads),), jnp.float32))
                             if head_combine == "learned" else None)

    def stem(self, x: jax.Array) -> jax.Array:
        """conv1, bn1, ReLU and the 3x3 max pool: the input of layer1."""
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        return max_pool(x, 3, 2, 1)   # pads with -inf, as torch's max_pool2d does

    def stage(self, index: int, x: jax.Array) -> jax.Array:
        """layer{index + 1} (index 0..3): its blocks, then its stage attention."""
        for block in (self.layer1, self.layer2, self.layer3, self.layer4)[index]:
            x = block(x)
        return self.stage_attention[index](x)

    def features(self, x: jax.Array, start: int = 0) -> list[jax.Array]:
        """The outputs of layer1..layer4 (after any stage attention) for images x.

        With start = k (1..4), x is the output of layer k instead, and the outputs of layers
        k+1..4 are returned (none for k = 4): the rest of the network from that point.
        """
        if start == 0:
            x = self.stem(x)
        outputs = []
        for index in range(start, 4):
            x = self.stage(index, x)
            outputs.append(x)
        return outputs

    def logits(self, stages: Sequence[jax.Array]) -> jax.Array:
        """Float32 logits from the stage outputs, the last ones last: the single head reads
        layer4's output (stages[-1]), the triple head layer2..4's (stages[-3:])."""
        if self.head == "single":
            return classify(stages[-1], self.attention, self.dropout, self.fc).astype(jnp.float32)
        logits = jnp.stack([head(s) for head, s in zip(self.heads, stages[-3:])])
        logits = logits.astype(jnp.float32)
        if self.head_combine == "mean":
            return jnp.mean(logits, axis=0)
        return jnp.einsum("k,knc->nc", jax.nn.softmax(self.head_weights[...]), logits)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.logits(self.features(x))


@register("resnet18")
def resnet18(*, num_classes: int, rngs: nnx.Rngs, **options: Any) -> ResNet:
    """ResNet-18 (basic blocks 2-2-2-2); `options` as ResNet."""
    return ResNet(18, num_classes=num_classes, rngs=rngs, **options)


@register("resnet34")
def resnet34(*, num_classes: int, rngs: nnx.Rngs, **options: Any) -> ResNet:
    """ResNet-34 (basic blocks 3-4-6-3); `options` as ResNet."""
    return ResNet(34, num_classes=num_classes, rngs=rngs, **options)


@register("resnet50")
def resnet50(*, num_classes: int, rngs: nnx.Rngs, **options: Any) -> ResNet:
    """ResNet-50 (bottlenecks 3-4-6-3); `options` as ResNet."""
    return ResNet(50, num_classes=num_classes, rngs=rngs, **options)


@register("resnet101")
def resnet101(*, num_classes: int, rngs: nnx.Rngs, **options: Any) -> ResNet:
    """ResNet-101 (bottlenecks 3-4-23-3); `options` as ResNet."""
    return ResNet(101, num_classes=num_classes, rngs=rngs, **options)


@register("dual_attention_resnet34")
def dual_attention_resnet34(*, num_classes: int, rngs: nnx.Rngs, **options: Any) -> ResNet:
    """The third-party reading of the study's model: ResNet-34, squeeze-excite (r=16) then CBAM
    spatial attention on the layer4 map (attention 'dual', placement 'last'), global average
    pool, dropout 0.5, linear. `options` override these defaults."""
    return ResNet(34, num_classes=num_classes, rngs=rngs, **(DUAL_ATTENTION | options))


@register("triple_head_dual_attention_resnet18")
def triple_head_dual_attention_resnet18(*, num_classes: int, rngs: nnx.Rngs,
                                        **options: Any) -> ResNet:
    """ResNet-18 with the triple head on layer2/3/4, each head with its own 'dual' attention
    (squeeze-excite r=16, then CBAM spatial), dropout 0.5, logits averaged. `options` override."""
    return ResNet(18, num_classes=num_classes, rngs=rngs, **(TRIPLE_HEAD | options))


def from_torchvision(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """torchvision ResNet state dict -> {our parameter path: array} in Flax layout.

    Paths are `nnx.to_flat_state(nnx.state(model))` paths joined by '/' (`layer1/0/conv1/kernel`,
    `layer2/0/downsample/bn/mean`, `fc/kernel`). Conv weights (O, I, kh, kw) become (kh, kw, I, O),
    linear weights (O, I) become (I, O); `num_batches_tracked` is dropped.
    """
    # One-dimensional entries are BatchNorm weights and statistics or biases (kept as `bias`).
    renames = {"weight": "scale", "running_mean": "mean", "running_var": "var"}
    converted = {}
    for key, value in state_dict.items():
        value = np.asarray(value)
        *module, name = key.split(".")
        if name == "num_batches_tracked":
            continue
        if module[-2:-1] == ["downsample"]:
            module[-1] = {"0": "conv", "1": "bn"}[module[-1]]
        if value.ndim == 4:
            name, value = "kernel", value.transpose(2, 3, 1, 0)
        elif value.ndim == 2:
            name, value = "kernel", value.T
        else:
            name = renames.get(name, name)
        converted["/".join([*module, name])] = np.ascontiguousarray(value)
    return converted
