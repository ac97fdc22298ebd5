"""CPU-friendly forms of two ResNet operations, chosen when a function is traced.

XLA's CPU backend runs two of the ResNet's operations far slower than the same arithmetic written
another way (`benchmarks/RESULTS.md`, "Closing the CPU gap"):

    1x1 convolution   y = x[:, ::s, ::s, :].reshape(-1, C_in) @ W.reshape(C_in, C_out)
                      (the convolution form, forward + backward, 1.5-5x slower)
    max pooling       the maximum of the k*k shifted strided views of the padded input, with a
                      gradient that goes to the first maximum of each window (row-major), as
                      XLA's select-and-scatter and torch's max_pool2d do; forward + backward of
                      the stem's pool at 224 px, batch 8: about 90 ms with select-and-scatter,
                      9-18 ms this way

Both compute the same function as the library form (the matrix product sums in another order:
float32 results agree to rounding; the pooling is exact), tested in `tests/test_layers.py`. GPUs
and TPUs keep the library forms, which their compilers handle well. The choice is read when a
function is traced, from HER2JAX_REWRITES:

    auto   (default) rewrite when JAX's default backend is the CPU
    on     always rewrite
    off    never (the library forms: jax.lax.conv_general_dilated, flax's max_pool)

`conv_general_dilated` has `jax.lax.conv_general_dilated`'s signature and is passed to
`nnx.Conv(conv_general_dilated=...)`, so parameters, names and checkpoints do not change.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from her2jax.errors import InvalidSetting

MODES = ("auto", "on", "off")
ENVIRONMENT = "HER2JAX_REWRITES"
NHWC = ("NHWC", "HWIO", "NHWC")


def rewrites_on() -> bool:
    """Whether HER2JAX_REWRITES asks for the CPU forms on the current default backend."""
    mode = os.environ.get(ENVIRONMENT, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise InvalidSetting(f"{ENVIRONMENT}={mode!r}: choose one of {', '.join(MODES)}")
    if mode == "auto":
        return jax.default_backend() == "cpu"
    return mode == "on"


def _zero_padding(padding: str | Sequence[tuple[int, int]]) -> bool:
    if isinstance(padding, str):   # 'SAME' pads nothing for a 1x1 kernel at any stride
        return padding.upper() in ("VALID", "SAME")
    return all(tuple(pair) == (0, 0) for pair in padding)


def _ones(values: Sequence[int] | None) -> bool:
    return values is None or all(v == 1 for v in values)


def is_pointwise(lhs: jax.Array, rhs: jax.Array, padding, lhs_dilation, dimension_numbers,
                 feature_group_count: int, batch_group_count: int) -> bool:
    """True for a 2-D 1x1 convolution in NHWC/HWIO that a matrix product computes exactly."""
    if lhs.ndim != 4 or rhs.ndim != 4 or rhs.shape[:2] != (1, 1):
        return False
    if feature_group_count != 1 or batch_group_count != 1 or not _ones(lhs_dilation):
        return False
    if not _zero_padding(padding):
        return False
    expected = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
    given = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    return given == expected


def pointwise_matmul(lhs: jax.Array, rhs: jax.Array, strides: Sequence[int], *,
                     precision=None, preferred_element_type=None) -> jax.Array:
    """A 1x1 NHWC convolution with the given strides as one 2-D matrix product."""
    if any(s != 1 for s in strides):
        lhs = lhs[:, ::strides[0], ::strides[1], :]
    n, h, w, c = lhs.shape
    out = jnp.matmul(lhs.reshape(n * h * w, c), rhs.reshape(c, rhs.shape[-1]),
                     precision=precision, preferred_element_type=preferred_element_type)
    return out.reshape(n, h, w, rhs.shape[-1])


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: Any, lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None, dimension_numbers=None,
                         feature_group_count: int = 1, batch_group_count: int = 1,
                         precision=None, preferred_element_type=None,
                         out_sharding=None) -> jax.Array:
    """`jax.lax.conv_general_dilated`, with 1x1 convolutions as matrix products where chosen."""
    if (out_sharding is None and rewrites_on()
            and is_pointwise(lhs, rhs, padding, lhs_dilation, dimension_numbers,
                             feature_group_count, batch_group_count)):
        return pointwise_matmul(lhs, rhs, tuple(window_strides), precision=precision,
                                preferred_element_type=preferred_element_type)
    extra = {} if out_sharding is None else {"out_sharding": out_sharding}
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type, **extra)


def _window_views(padded: jax.Array, window: int, stride: int, out_h: int, out_w: int):
    """The window * window strided views of `padded`, row-major: view (i, j) holds
    padded[:, i + stride * a, j + stride * b, :] at (a, b)."""
    span_h, span_w = stride * (out_h - 1) + 1, stride * (out_w - 1) + 1
    for i in range(window):
        for j in range(window):
            yield (i, j), padded[:, i:i + span_h:stride, j:j + span_w:stride, :]


def _pool_geometry(x: jax.Array, window: int, stride: int, padding: int):
    _, h, w, _ = x.shape
    out_h = (h + 2 * padding - window) // stride + 1
    out_w = (w + 2 * padding - window) // stride + 1
    if out_h < 1 or out_w < 1:
        raise InvalidSetting(f"max pool of window {window} does not fit a {h}x{w} input with "
                             f"padding {padding}")
    return out_h, out_w


def _pad(x: jax.Array, padding: int) -> jax.Array:
    """Pads the spatial axes of a floating-point NHWC array with -inf, the identity of max."""
    return jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)),
                   constant_values=-jnp.inf)


def _max_pool_views(x: jax.Array, window: int, stride: int, padding: int) -> jax.Array:
    out_h, out_w = _pool_geometry(x, window, stride, padding)
    views = (v for _, v in _window_views(_pad(x, padding), window, stride, out_h, out_w))
    out = next(views)
    for view in views:
        out = jnp.maximum(out, view)
    return out


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x: jax.Array, window: int, stride: int, padding: int) -> jax.Array:
    return _max_pool_views(x, window, stride, padding)


def _max_pool_forward(x, window, stride, padding):
    out = _max_pool_views(x, window, stride, padding)
    return out, (x, out)


def _max_pool_backward(window, stride, padding, residuals, grad):
    """Each window's gradient to its first maximum: a view takes the gradient where it equals
    the maximum and no earlier view did; it goes back to the input through the transpose of the
    strided slice (an interior-padded pad)."""
    x, out = residuals
    padded = _pad(x, padding)
    out_h, out_w = out.shape[1:3]
    taken = jnp.zeros(out.shape, bool)
    zero = jnp.zeros((), grad.dtype)
    total = jnp.zeros(padded.shape, grad.dtype)
    for (i, j), view in _window_views(padded, window, stride, out_h, out_w):
        first = (view == out) & ~taken
        taken = taken | first
        share = jnp.where(first, grad, zero)
        config = ((0, 0, 0),
                  (i, padded.shape[1] - i - stride * (out_h - 1) - 1, stride - 1),
                  (j, padded.shape[2] - j - stride * (out_w - 1) - 1, stride - 1),
                  (0, 0, 0))
        total = total + jax.lax.pad(share, zero, config)
    h, w = x.shape[1:3]
    return (total[:, padding:padding + h, padding:padding + w, :],)


_max_pool.defvjp(_max_pool_forward, _max_pool_backward)


def max_pool(x: jax.Array, window: int, stride: int, padding: int) -> jax.Array:
    """Max pooling of NHWC `x` over window x window patches with symmetric padding by -inf (torch's
    max_pool2d(window, stride, padding)); the CPU form above where chosen, flax's otherwise."""
    if rewrites_on():
        return _max_pool(x, window, stride, padding)
    return nnx.max_pool(x, (window, window), strides=(stride, stride),
                        padding=((padding, padding), (padding, padding)))


# ---------------------------------------------------------------- dropout with a traced rate

_KEEP: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar(
    "her2jax_dropout_keep", default=None)


@contextlib.contextmanager
def dropout_keep(keep: jax.Array | None):
    """Inside, every `Dropout` of a model that is called keeps each value with probability `keep`
    (a float32 scalar, traced in a compiled step: the members of a pack each have their own)
    instead of 1 - its own rate; None leaves the modules' rates. Give keep as float32(1 - rate)
    computed on the host, as nnx.Dropout computes it, for the same scaling to the last bit."""
    token = _KEEP.set(keep)
    try:
        yield
    finally:
        _KEEP.reset(token)


class Dropout(nnx.Dropout):
    """nnx.Dropout whose keep probability may be given as an array (`dropout_keep`): the same
    mask and scaling as nnx.Dropout for the same key and rate."""

    def __call__(self, inputs, *, deterministic: bool | None = None, rngs=None):
        keep = _KEEP.get()
        if keep is None:
            return super().__call__(inputs, deterministic=deterministic, rngs=rngs)
        if self.deterministic if deterministic is None else deterministic:
            return inputs
        source = rngs if rngs is not None else self.rngs
        key = source[self.rng_collection]() if isinstance(source, nnx.Rngs) else \
            source() if isinstance(source, nnx.RngStream) else source
        shape = [1 if dim in self.broadcast_dims else size
                 for dim, size in enumerate(inputs.shape)]
        mask = jnp.broadcast_to(jax.random.bernoulli(key, p=keep, shape=shape), inputs.shape)
        return jax.lax.select(mask, inputs / jnp.asarray(keep, inputs.dtype),
                              jnp.zeros_like(inputs))


def dropout_rates(model: nnx.Module) -> set[float]:
    """The rates of the model's dropout modules."""
    return {float(module.rate) for _, module in nnx.iter_modules(model)
            if isinstance(module, nnx.Dropout)}
