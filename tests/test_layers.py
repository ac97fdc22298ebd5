"""The CPU forms of 1x1 convolutions and max pooling against the library forms and torch."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from her2jax import models
from her2jax.models import layers, resnet

NHWC = ("NHWC", "HWIO", "NHWC")


def primitives(fn, *args) -> set[str]:
    """Names of the primitives in fn's jaxpr, nested ones (custom_vjp, pjit) included."""
    found: set[str] = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            found.add(eqn.primitive.name)
            for value in eqn.params.values():
                for sub in value if isinstance(value, (list, tuple)) else [value]:
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def lax_conv(x, w, stride, padding=((0, 0), (0, 0))):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=NHWC)


def ours(x, w, stride, padding=((0, 0), (0, 0))):
    return layers.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=NHWC)


@pytest.fixture
def rewrites(monkeypatch):
    monkeypatch.setenv(layers.ENVIRONMENT, "on")


@pytest.mark.parametrize("stride,size", [(1, 6), (2, 6), (2, 7), (3, 8)])
def test_pointwise_convolution_equals_the_convolution_with_its_gradients(rewrites, stride, size):
    rng = np.random.default_rng(stride * 10 + size)
    x = jnp.asarray(rng.normal(size=(3, size, size, 5)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(1, 1, 5, 4)).astype(np.float32))
    np.testing.assert_allclose(ours(x, w, stride), lax_conv(x, w, stride), rtol=1e-5, atol=1e-5)
    probe = jnp.asarray(rng.normal(size=lax_conv(x, w, stride).shape).astype(np.float32))

    def gradients(conv):
        return jax.grad(lambda x, w: jnp.sum(conv(x, w, stride) * probe), argnums=(0, 1))(x, w)

    grads = [gradients(ours), gradients(lax_conv)]
    for got, want in zip(*grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # the rewrite did happen: a matrix product, no convolution
    found = primitives(lambda x, w: ours(x, w, stride), x, w)
    assert "dot_general" in found and "conv_general_dilated" not in found


@pytest.mark.parametrize("case", ["3x3", "padded 1x1", "grouped", "nchw"])
def test_other_convolutions_stay_convolutions(rewrites, case):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 6, 6, 4)).astype(np.float32))
    kernel = (3, 3, 4, 2) if case == "3x3" else (1, 1, 2 if case == "grouped" else 4, 2)
    w = jnp.asarray(rng.normal(size=kernel).astype(np.float32))
    args = dict(window_strides=(1, 1), padding=((1, 1), (1, 1)) if case != "3x3" else "SAME",
                dimension_numbers=NHWC)
    if case == "grouped":
        args.update(padding="VALID", feature_group_count=2)
    if case == "nchw":
        x = x.transpose(0, 3, 1, 2)
        w = w.transpose(3, 2, 0, 1)
        args.update(padding="VALID", dimension_numbers=("NCHW", "OIHW", "NCHW"))
    np.testing.assert_array_equal(layers.conv_general_dilated(x, w, **args),
                                  jax.lax.conv_general_dilated(x, w, **args))
    assert "conv_general_dilated" in primitives(
        lambda x, w: layers.conv_general_dilated(x, w, **args), x, w)


def test_the_environment_switches_the_rewrites(monkeypatch):
    x = jnp.ones((1, 4, 4, 3))
    w = jnp.ones((1, 1, 3, 2))

    def lowered():
        found = primitives(lambda x, w: ours(x, w, 1), x, w)
        pooled = primitives(lambda x: layers.max_pool(x, 3, 2, 1), x)
        return "conv_general_dilated" in found, "reduce_window_max" in pooled

    monkeypatch.setenv(layers.ENVIRONMENT, "off")
    assert lowered() == (True, True)
    monkeypatch.setenv(layers.ENVIRONMENT, "on")
    assert lowered() == (False, False)
    monkeypatch.setenv(layers.ENVIRONMENT, "auto")   # the tests run on the CPU backend
    assert jax.default_backend() != "cpu" or lowered() == (False, False)
    monkeypatch.setenv(layers.ENVIRONMENT, "sometimes")
    with pytest.raises(ValueError, match="HER2JAX_REWRITES='sometimes'.*auto, on, off"):
        ours(x, w, 1)


def torch_pool(x: np.ndarray, probe: np.ndarray, window: int, stride: int, padding: int):
    """torch max_pool2d's output and input gradient for sum(output * probe), NHWC."""
    xt = torch.tensor(x).permute(0, 3, 1, 2).requires_grad_(True)
    out = torch.nn.functional.max_pool2d(xt, window, stride, padding)
    (grad,) = torch.autograd.grad(out, xt, torch.tensor(probe).permute(0, 3, 1, 2))
    return out.detach().permute(0, 2, 3, 1).numpy(), grad.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("window,stride,padding,size", [(3, 2, 1, 9), (3, 2, 1, 8), (2, 2, 0, 6),
                                                        (3, 1, 1, 5), (5, 3, 2, 11)])
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_equals_torch_with_the_first_maximum_taking_the_gradient(
        rewrites, window, stride, padding, size, ties):
    rng = np.random.default_rng(size + window)
    x = rng.normal(size=(2, size, size, 3)).astype(np.float32)
    if ties:   # ReLU'd integers: whole windows of zeros and repeated maxima
        x = np.maximum(np.round(x), 0.0).astype(np.float32)
    out, pullback = jax.vjp(lambda v: layers.max_pool(v, window, stride, padding), jnp.asarray(x))
    probe = rng.normal(size=out.shape).astype(np.float32)
    want_out, want_grad = torch_pool(x, probe, window, stride, padding)
    np.testing.assert_array_equal(out, want_out)
    (grad,) = pullback(jnp.asarray(probe))
    np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-6)
    flax_out, flax_pullback = jax.vjp(
        lambda v: nnx.max_pool(v, (window, window), strides=(stride, stride),
                               padding=((padding, padding), (padding, padding))), jnp.asarray(x))
    np.testing.assert_array_equal(out, flax_out)
    np.testing.assert_allclose(grad, flax_pullback(jnp.asarray(probe))[0], rtol=1e-6, atol=1e-6)


def test_max_pool_keeps_bfloat16_and_refuses_a_window_larger_than_the_input(rewrites):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 6, 6, 2)), jnp.bfloat16)
    out = layers.max_pool(x, 3, 2, 1)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        out, nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1))))
    with pytest.raises(ValueError, match="window 5 does not fit a 2x2 input"):
        layers.max_pool(jnp.zeros((1, 2, 2, 1)), 5, 1, 0)


def model_outputs(name: str, monkeypatch, mode: str, **options):
    """Training-mode logits and parameter gradients of a fresh model (same seed) under `mode`."""
    monkeypatch.setenv(layers.ENVIRONMENT, mode)
    model = models.create(name, num_classes=2, rngs=nnx.Rngs(0), dropout=0.0, **options)
    model.train()
    graph, params, rest = nnx.split(model, nnx.Param, ...)
    x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 64, 64, 3)).astype(np.float32))

    @jax.jit
    def run(params, rest):
        def loss(model):
            logits = model(x)
            return jnp.sum(logits * jnp.array([1.0, -2.0])), logits
        return nnx.grad(loss, has_aux=True)(nnx.merge(graph, params, rest))

    grads, logits = run(params, rest)
    return np.asarray(logits), {"/".join(map(str, k)): np.asarray(v)
                                for k, v in nnx.to_flat_state(grads)}


@pytest.mark.parametrize("name,options", [("resnet50", {"attention": "dual"}),
                                          ("resnet18", {"attention": "danet"})])
def test_models_give_the_same_logits_and_gradients_with_and_without_rewrites(
        monkeypatch, name, options):
    """The whole network (1x1 convolutions in the bottlenecks, downsampling shortcuts and DANet's
    position attention; the stem's max pool) against the library forms. The ResNet-50 keeps its
    stem, bottleneck blocks and head with fewer blocks per stage (1, 2, 1, 1: each stage's
    downsampling block, and one identity block): a block's computation is the same in every
    position, and the compile is a quarter of the full network's."""
    if name == "resnet50":
        monkeypatch.setitem(resnet.ARCHITECTURES, 50, (resnet.Bottleneck, (1, 2, 1, 1)))
    on_logits, on_grads = model_outputs(name, monkeypatch, "on", **options)
    off_logits, off_grads = model_outputs(name, monkeypatch, "off", **options)
    np.testing.assert_allclose(on_logits, off_logits, rtol=1e-4, atol=1e-4)
    assert on_grads.keys() == off_grads.keys()
    for key in on_grads:
        scale = max(float(np.max(np.abs(off_grads[key]))), 1e-6)
        np.testing.assert_allclose(on_grads[key] / scale, off_grads[key] / scale, atol=2e-4,
                                   err_msg=key)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dropout_with_a_traced_rate_draws_nnx_dropouts_mask(dtype):
    # a pack passes each member's rate as an array (vmapped): the mask and the scaling must be
    # nnx.Dropout's for the same key and rate, member by member
    x = jax.random.normal(jax.random.key(0), (6, 32), dtype)
    keep = jnp.array([1.0 - 0.0, 1.0 - 0.25, 1.0 - 0.6], jnp.float32)

    def traced(keep, key):
        module = layers.Dropout(0.5, rngs=nnx.Rngs(dropout=key))
        with layers.dropout_keep(keep):
            return module(x, deterministic=False)

    got = jax.jit(jax.vmap(traced))(keep, jax.vmap(jax.random.key)(jnp.arange(3)))
    for k, rate in enumerate([0.0, 0.25, 0.6]):
        expected = nnx.Dropout(rate, rngs=nnx.Rngs(dropout=jax.random.key(k)))(
            x, deterministic=False)
        np.testing.assert_array_equal(np.asarray(got[k], np.float32),
                                      np.asarray(expected, np.float32))
        assert got.dtype == dtype
    model = models.create("resnet18", attention="dual", dropout=0.3, rngs=nnx.Rngs(0))
    assert layers.dropout_rates(model) == {0.3}
