"""ViT: shapes, parameter counts and logits against timm, position-embedding resampling,
dropout and stochastic depth, mixed precision."""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from her2jax import models
from her2jax.models import vit

VIT_NAMES = [f"vit_{size}_patch{patch}" for size in ("tiny", "small", "base")
             for patch in (16, 32)] + ["vit_tiny_patch4"]


def images(batch: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
    return {"/".join(map(str, path)): np.asarray(variable[...])
            for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def load(model: nnx.Module, params: dict[str, np.ndarray]) -> None:
    """Copies every parameter of `model` from `params`: same paths, same shapes, no extras."""
    state = nnx.state(model, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    assert {"/".join(map(str, path)) for path in flat} == set(params)
    for path, variable in flat.items():
        value = params["/".join(map(str, path))]
        assert value.shape == variable[...].shape, path
        variable[...] = jnp.asarray(value)
    nnx.update(model, state)


def tiny(seed: int = 0, **options) -> vit.VisionTransformer:
    options.setdefault("image_size", 32)
    return models.create("vit_tiny_patch16", num_classes=3, rngs=nnx.Rngs(seed), **options)


# ---------------------------------------------------------------- construction

def test_all_sizes_are_registered():
    assert set(VIT_NAMES) <= set(models.names())


@pytest.mark.parametrize("name", VIT_NAMES)
def test_logits_shape_in_train_and_eval(name):
    """Every variant is built and traced in both modes; the tiny ones also run (the others
    only differ in width and heads, and compiling them would dominate the suite's time)."""
    runs = name.startswith("vit_tiny")

    def build() -> vit.VisionTransformer:
        return models.create(name, num_classes=3, image_size=32, dropout=0.1, drop_path=0.1,
                             rngs=nnx.Rngs(0))

    model = build() if runs else nnx.eval_shape(build)
    x = images(2, 32)
    for set_mode in (model.train, model.eval):
        set_mode()
        logits = model(x) if runs else nnx.eval_shape(lambda m, images: m(images), model, x)
        assert logits.shape == (2, 3) and logits.dtype == jnp.float32
        if runs:
            assert np.isfinite(np.asarray(logits)).all()


def timm_model(name: str, **kwargs):
    """timm's counterpart of one of our registered names (random initialisation)."""
    import timm
    import timm.models.vision_transformer as timm_vit

    if name in ("vit_tiny_patch32", "vit_tiny_patch4"):  # no timm entry point; same class
        return timm_vit.VisionTransformer(patch_size=int(name.rsplit("patch", 1)[1]),
                                          embed_dim=192, depth=12, num_heads=3, **kwargs)
    return timm.create_model(f"{name}_224", pretrained=False, **kwargs)


@pytest.mark.parametrize("name", VIT_NAMES)
def test_parameter_count_equals_timm(name):
    shapes = nnx.eval_shape(lambda: models.create(name, num_classes=1000, rngs=nnx.Rngs(0)))
    ours = sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(shapes, nnx.Param)))
    import torch

    with torch.device("meta"):   # shapes only: skips timm's weight initialisation
        reference = timm_model(name)
    assert ours == sum(parameter.numel() for parameter in reference.parameters())


def test_unknown_options_and_bad_values_fail():
    with pytest.raises(ValueError, match="unknown options"):
        models.create("vit_tiny_patch16", blocks=3)
    with pytest.raises(ValueError, match="pool"):
        tiny(pool="max")
    with pytest.raises(ValueError, match="multiple"):
        models.create("vit_tiny_patch16", image_size=40)
    with pytest.raises(ValueError, match="patches"):
        tiny()(images(1, 40))
    with pytest.raises(ValueError, match="attention_kernel must be one of"):
        tiny(attention_kernel="flash")


# ---------------------------------------------------------------- timm weights

def perturbed_timm(name: str, **kwargs):
    """timm model in eval mode whose biases, LayerNorms and class token are no longer 0 / 1
    (timm's init), so a wrong or swapped mapping changes the logits; the head is scaled up so
    logits are far from 0."""
    import torch

    torch.manual_seed(0)
    model = timm_model(name, **kwargs).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))
        model.cls_token.normal_(std=0.5)
        model.head.weight.mul_(10.0)
    return model


@pytest.mark.parametrize("name, pool", [("vit_tiny_patch16", "token"),
                                        ("vit_small_patch16", "token"),
                                        ("vit_tiny_patch16", "avg")])
def test_converted_timm_weights_give_timm_logits(name, pool):
    import torch

    reference = perturbed_timm(name, global_pool=pool)
    x = images(2, 224)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    model = models.create(name, num_classes=1000, pool=pool, rngs=nnx.Rngs(0))
    state_dict = {key: value.numpy() for key, value in reference.state_dict().items()}
    load(model, vit.from_timm(state_dict))
    model.eval()
    logits = np.asarray(nnx.jit(lambda m, images: m(images))(model, x))
    assert np.abs(expected).max() > 1.0
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)


def test_from_timm_layouts_and_refusals():
    converted = vit.from_timm({"patch_embed.proj.weight": np.zeros((192, 3, 16, 16)),
                               "blocks.3.attn.qkv.weight": np.zeros((576, 192)),
                               "blocks.3.norm1.weight": np.zeros(192)})
    assert converted["patch_embed/proj/kernel"].shape == (16, 16, 3, 192)
    assert converted["blocks/3/attn/qkv/kernel"].shape == (192, 576)
    assert "blocks/3/norm1/scale" in converted
    with pytest.raises(ValueError, match="reg_token"):
        vit.from_timm({"reg_token": np.zeros((1, 4, 192))})


# ---------------------------------------------------------------- position embeddings

@pytest.mark.parametrize("grid", [(2, 2), (7, 5), (20, 20)])
def test_resize_pos_embed_matches_timm(grid):
    import torch
    from timm.layers import resample_abs_pos_embed

    pos_embed = np.random.default_rng(0).normal(size=(1, 1 + 14 * 14, 8)).astype(np.float32)
    expected = resample_abs_pos_embed(torch.from_numpy(pos_embed), list(grid)).numpy()
    np.testing.assert_allclose(vit.resize_pos_embed(pos_embed, grid), expected, atol=1e-5)


def test_resize_to_the_same_grid_is_identity():
    pos_embed = np.random.default_rng(0).normal(size=(1, 1 + 6 * 6, 4)).astype(np.float32)
    np.testing.assert_array_equal(vit.resize_pos_embed(pos_embed, (6, 6)), pos_embed)
    np.testing.assert_array_equal(vit.resample_matrix(6, 6), np.eye(6))


def test_enlarging_keeps_a_linear_ramp_linear():
    """e(r, c) = 2 r - 3 c + 1 on an 8 x 8 grid, enlarged to 12 x 12. Output i sits at source
    coordinate (i + 1/2) 8/12 - 1/2; rows and columns 2..9 have all four cubic taps inside."""
    rows, cols = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    ramp = (2.0 * rows - 3.0 * cols + 1.0).reshape(1, 64, 1)
    pos_embed = np.concatenate([np.full((1, 1, 1), 7.0), ramp], axis=1).astype(np.float32)
    resized = vit.resize_pos_embed(pos_embed, (12, 12))
    source = (np.arange(12) + 0.5) * 8 / 12 - 0.5
    expected = 2.0 * source[:, None] - 3.0 * source[None, :] + 1.0
    assert resized[0, 0, 0] == 7.0
    np.testing.assert_allclose(resized[0, 1:, 0].reshape(12, 12)[2:10, 2:10],
                               expected[2:10, 2:10], atol=1e-5)


def test_model_built_at_224_runs_on_32_pixel_images():
    """Resampling inside the forward pass equals loading resampled weights into a 32-px model."""
    built_at_224 = models.create("vit_tiny_patch16", num_classes=3, rngs=nnx.Rngs(0))
    params = flat_params(built_at_224)
    params["pos_embed"] = vit.resize_pos_embed(params["pos_embed"], (2, 2))
    built_at_32 = tiny(seed=1)
    load(built_at_32, params)
    built_at_224.eval()
    built_at_32.eval()
    x = images(2, 32)
    np.testing.assert_allclose(built_at_224(x), built_at_32(x), atol=1e-5)


# ---------------------------------------------------------------- dropout, depth, precision

def test_drop_path_rates_rise_linearly():
    model = tiny(drop_path=0.22)
    np.testing.assert_allclose([block.drop_path1.rate for block in model.blocks],
                               np.linspace(0.0, 0.22, 12))
    np.testing.assert_allclose([block.drop_path2.rate for block in model.blocks],
                               np.linspace(0.0, 0.22, 12))


def test_drop_path_drops_whole_samples_and_rescales():
    drop = vit.DropPath(0.5, rngs=nnx.Rngs(0))
    out = np.asarray(drop(jnp.ones((64, 5, 4))))
    per_sample = out.reshape(64, -1)
    assert set(np.unique(per_sample)) == {0.0, 2.0}
    assert (per_sample.min(axis=1) == per_sample.max(axis=1)).all()
    drop.eval()
    np.testing.assert_array_equal(drop(jnp.ones((64, 5, 4))), np.ones((64, 5, 4)))


def test_eval_mode_is_deterministic_and_ignores_the_rates():
    x = images(2, 32)
    noisy, plain = tiny(dropout=0.5, drop_path=0.5), tiny()
    noisy.eval()
    plain.eval()
    first = np.asarray(noisy(x))
    np.testing.assert_array_equal(first, noisy(x))
    np.testing.assert_array_equal(first, plain(x))


@pytest.mark.parametrize("options", [{"drop_path": 0.5}, {"dropout": 0.5}])
def test_train_mode_draws_new_masks(options):
    x = images(2, 32)
    model, control = tiny(**options), tiny()
    model.train()
    control.train()
    assert not np.allclose(model(x), model(x))
    np.testing.assert_array_equal(control(x), control(x))


def test_bfloat16_compute_keeps_float32_parameters():
    x = images(2, 32)
    half, full = tiny(dtype="bfloat16"), tiny()
    half.eval()
    full.eval()
    dtypes = {np.dtype(leaf.dtype) for leaf in jax.tree.leaves(nnx.state(half, nnx.Param))}
    assert dtypes == {np.dtype(np.float32)}
    low, high = np.asarray(half(x)), np.asarray(full(x))
    assert low.dtype == np.float32
    assert 0 < np.abs(low - high).max() < 0.05 * np.abs(high).max() + 0.05


# ---------------------------------------------------------------- attention kernels

def test_cudnn_attention_kernel_falls_back_where_cudnn_cannot_run(monkeypatch):
    """On this CPU (and in float32 anywhere) attention_kernel='cudnn' computes with the written-out
    kernel, bit for bit, and says so once per reason, not once per block or call."""
    monkeypatch.setattr(vit, "_warned_cudnn", set())
    x = images(2, 32)
    written, fused = tiny(), tiny(attention_kernel="cudnn")
    written.eval()
    fused.eval()
    with pytest.warns(UserWarning, match="attention_kernel='cudnn': JAX's device is cpu") as seen:
        out = np.asarray(fused(x))
        fused(x)
    assert len([w for w in seen if "attention_kernel" in str(w.message)]) == 1
    np.testing.assert_array_equal(out, np.asarray(written(x)))


def test_auto_attention_kernel_is_the_default_and_silently_xla_where_cudnn_cannot_run(
        monkeypatch):
    """'auto' (the default) computes with the written-out kernel on this CPU, bit for bit, without
    a warning; where cuDNN can run it calls the fused op."""
    monkeypatch.setattr(vit, "_warned_cudnn", set())
    x = images(2, 32)
    written, default = tiny(attention_kernel="xla"), tiny()
    assert all(block.attn.attention_kernel == "auto" for block in default.blocks)
    written.eval()
    default.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(np.asarray(default(x)), np.asarray(written(x)))
    calls = []
    monkeypatch.setattr(vit, "cudnn_attention_usable", lambda dtype, warn=True: True)
    monkeypatch.setattr(vit, "cudnn_attention",
                        lambda query, key, value, scale: calls.append(scale) or query)
    default(x)
    assert len(calls) == 12


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-5), ("bfloat16", 0.05)])
@pytest.mark.parametrize("size, multiple, padded", [
    (32, 2, 6),     # 1 + 2x2 = 5 tokens: padded to 6, true lengths passed
    (48, 2, 10),    # 1 + 3x3 = 10 tokens: even, called as it is
    (32, 8, 8),     # another multiple
])
def test_cudnn_attention_kernel_calls_the_fused_op_with_the_same_function(
        monkeypatch, dtype, tolerance, size, multiple, padded):
    """Where cuDNN can run, the model calls jax.nn.dot_product_attention(implementation='cudnn')
    on (batch, tokens, heads, head width) q, k, v with scale 1/sqrt(head width), the tokens
    padded to a multiple of CUDNN_TOKEN_MULTIPLE with the true lengths given; here its XLA
    implementation (which honours the lengths the same way) stands in for cuDNN, and the logits
    and gradients must be the written-out kernel's."""
    calls, lengths = [], []
    real = jax.nn.dot_product_attention

    def fused(query, key, value, *, scale, implementation, query_seq_lengths=None,
              key_value_seq_lengths=None):
        calls.append((query.shape, implementation, scale, query_seq_lengths is None,
                      key_value_seq_lengths is None))
        if query.shape[1] % multiple:
            raise NotImplementedError(f"Unsupported sequence length Q {query.shape[1]}")
        if query_seq_lengths is not None:     # the values, from inside the compiled program
            jax.debug.callback(lambda q, k: lengths.append((np.asarray(q), np.asarray(k))),
                               query_seq_lengths, key_value_seq_lengths)
        return real(query, key, value, scale=scale, query_seq_lengths=query_seq_lengths,
                    key_value_seq_lengths=key_value_seq_lengths, implementation="xla")

    monkeypatch.setattr(vit, "cudnn_attention_usable", lambda dtype, warn=True: True)
    monkeypatch.setattr(vit, "CUDNN_TOKEN_MULTIPLE", multiple)
    monkeypatch.setattr(jax.nn, "dot_product_attention", fused)
    x = jnp.asarray(images(2, size))
    options = {"dtype": dtype, "image_size": size, "depth": 2}
    # the reference asks for the written-out kernel: 'auto' would take the fused path here too
    written, with_fused = tiny(attention_kernel="xla", **options), tiny(attention_kernel="cudnn",
                                                                        **options)
    written.eval()
    with_fused.eval()

    @nnx.jit
    def loss_and_grads(model):
        def loss(model):
            return jnp.sum(model(x) ** 2)
        value, grads = nnx.value_and_grad(loss)(model)
        return value, jnp.concatenate([jnp.ravel(g) for g in jax.tree.leaves(grads)])

    value, grads = loss_and_grads(with_fused)
    assert len(calls) == 2 and {c[1] for c in calls} == {"cudnn"}   # each block, traced once
    shape, _, scale, no_query_lengths, no_key_lengths = calls[0]
    assert shape == (2, padded, 3, 64) and scale == pytest.approx(1 / 8)
    tokens = 1 + (size // 16) ** 2
    if padded == tokens:
        assert no_query_lengths and no_key_lengths and not lengths
    else:
        assert len(lengths) == 2
        for query_lengths, key_lengths in lengths:
            np.testing.assert_array_equal(query_lengths, [tokens, tokens])
            np.testing.assert_array_equal(key_lengths, [tokens, tokens])
    ref_value, ref_grads = (np.asarray(a, np.float32) for a in loss_and_grads(written))
    assert len(calls) == 2                    # the reference did not call the fused op
    assert float(value) == pytest.approx(float(ref_value), rel=tolerance)
    grads, scale = np.asarray(grads, np.float32), np.abs(ref_grads).max()
    assert np.abs(grads - ref_grads).max() <= tolerance * scale


def _nvidia_gpu() -> bool:
    try:
        return any(d.platform == "gpu" and "nvidia" in d.device_kind.lower()
                   for d in jax.devices())
    except RuntimeError:
        return False


@pytest.mark.skipif(not _nvidia_gpu(), reason="needs an NVIDIA GPU (benchmarks/gpu.sh runs it)")
def test_cudnn_attention_on_the_gpu_matches_the_written_out_kernel():
    """On an NVIDIA GPU, in bfloat16: cuDNN's fused attention (197 tokens, padded) gives the
    written-out kernel's logits and gradients of a ViT-S/16 at 224 px within bfloat16 rounding."""
    x = jnp.asarray(images(4, 224))
    options = {"num_classes": 3, "dtype": "bfloat16", "depth": 2}
    written = models.create("vit_small_patch16", rngs=nnx.Rngs(0), **options)
    fused = models.create("vit_small_patch16", rngs=nnx.Rngs(0), attention_kernel="cudnn",
                          **options)

    def loss_and_grads(model):
        def loss(model):
            return jnp.sum(model(x) ** 2)
        value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
        return float(value), np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])

    with warnings.catch_warnings():
        warnings.simplefilter("error")   # a fallback to 'xla' would make the test vacuous
        value, grads = loss_and_grads(fused)
    ref_value, ref_grads = loss_and_grads(written)
    assert value == pytest.approx(ref_value, rel=0.05)
    assert np.abs(grads - ref_grads).max() <= 0.05 * np.abs(ref_grads).max()
