"""Explanation maps: Grad-CAM and attention rollout against independent PyTorch / numpy
references, spatial gates against the modules' own outputs, overlays, PNGs and summaries."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from PIL import Image

from her2jax import models
from her2jax.analysis import maps as em
from her2jax.models import vit, weights
from her2jax.models.resnet import from_torchvision
from her2jax.training.steps import IMAGENET_MEAN, IMAGENET_STD, normalize_images
from test_resnet import randomised

SIZE = 64


def uint8_images(batch: int = 3, size: int = SIZE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)


def torch_input(images: np.ndarray) -> torch.Tensor:
    """The same ImageNet normalisation as steps.normalize_images, done in torch, NCHW."""
    x = torch.from_numpy(images).float() / 255.0
    x = (x - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    return x.permute(0, 3, 1, 2).contiguous()


def torch_upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return F.interpolate(torch.from_numpy(np.ascontiguousarray(maps, np.float32))[:, None],
                         size=size, mode="bilinear", align_corners=False,
                         antialias=False)[:, 0].numpy()


def by_max(maps: np.ndarray) -> np.ndarray:
    peak = maps.max(axis=(1, 2), keepdims=True)
    return np.where(peak > 0, maps / np.where(peak > 0, peak, 1), 0)


def load(model: nnx.Module, arrays: dict[str, np.ndarray]) -> None:
    report = weights.load_pretrained(model, arrays)
    assert not (report.missing or report.mismatched or report.unused), report


# ---------------------------------------------------------------- upsampling

@pytest.mark.parametrize("low,high", [((2, 2), (64, 64)), ((7, 5), (64, 48)), ((3, 4), (10, 17))])
def test_upsampling_is_torch_bilinear_without_align_corners(low, high):
    maps = np.random.default_rng(1).normal(size=(2, *low)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(em.upsample(jnp.asarray(maps), high)),
                               torch_upsample(maps, high), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- Grad-CAM

def randomised_resnet18() -> torch.nn.Module:
    """torchvision resnet18, 2 classes, random weights and non-trivial BatchNorm statistics."""
    return randomised("resnet18", num_classes=2)


def torch_grad_cam(net: torch.nn.Module, images: np.ndarray, target_class: int,
                   layer: str = "layer4") -> tuple[np.ndarray, np.ndarray]:
    """(feature-resolution ReLU(sum_c w_c A_c), upsampled and max-normalised), via a forward
    hook on `layer` and torch.autograd."""
    captured = {}
    handle = getattr(net, layer).register_forward_hook(
        lambda m, i, out: captured.__setitem__("A", out))
    try:
        logits = net(torch_input(images))
    finally:
        handle.remove()
    activations = captured["A"]                                               # (N, C, h, w)
    (gradients,) = torch.autograd.grad(logits[:, target_class].sum(), activations)
    weights_ = gradients.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights_ * activations).sum(dim=1)).detach().numpy()
    return cam, by_max(torch_upsample(cam, images.shape[1:3]))


@pytest.fixture(scope="module")
def converted_resnet18():
    net = randomised_resnet18()
    model = models.create("resnet18", num_classes=2, attention="none", dropout=0.0,
                          rngs=nnx.Rngs(1))
    load(model, from_torchvision({k: v.numpy() for k, v in net.state_dict().items()}))
    model.eval()
    return net, model


@pytest.mark.parametrize("target_class", [1, 0])
def test_grad_cam_matches_torch(converted_resnet18, target_class):
    net, model = converted_resnet18
    images = uint8_images()
    low_expected, expected = torch_grad_cam(net, images, target_class)
    assert (low_expected.max(axis=(1, 2)) > 0).all(), "a trivial reference map proves nothing"
    low = em.grad_cam_features(model, images, target_class)
    assert low.shape == low_expected.shape == (3, 2, 2)
    np.testing.assert_allclose(low, low_expected, atol=1e-4 * low_expected.max(), rtol=0)
    maps = em.grad_cam(model, images, target_class)
    assert maps.shape == (3, SIZE, SIZE) and maps.dtype == np.float32
    np.testing.assert_allclose(maps, expected, atol=1e-4, rtol=0)
    assert maps.min() >= 0 and np.allclose(maps.max(axis=(1, 2)), 1.0)


@pytest.mark.parametrize("layer, side", [(2, 8), (3, 4), (4, 2)])
def test_grad_cam_of_an_earlier_layer_matches_torch(converted_resnet18, layer, side):
    net, model = converted_resnet18
    images = uint8_images()
    low_expected, expected = torch_grad_cam(net, images, 1, f"layer{layer}")
    assert (low_expected.max(axis=(1, 2)) > 0).all()
    low = em.grad_cam_features(model, images, 1, layer=layer)
    assert low.shape == (3, side, side)
    np.testing.assert_allclose(low, low_expected, atol=1e-4 * low_expected.max(), rtol=0)
    np.testing.assert_allclose(em.grad_cam(model, images, 1, layer=layer), expected,
                               atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="layer"):
        em.grad_cam(model, images, layer=5)


def test_grad_cam_is_per_image_in_either_mode(converted_resnet18):
    """Running statistics and no dropout, so a map does not depend on the rest of the batch or
    on the mode the model was left in, and the model's mode is not changed."""
    _, model = converted_resnet18
    images = uint8_images()
    maps = em.grad_cam(model, images)
    np.testing.assert_allclose(em.grad_cam(model, images[1:2]), maps[1:2], atol=1e-5)
    model.train()
    try:
        np.testing.assert_allclose(em.grad_cam(model, images), maps, atol=1e-6)
        assert model.bn1.use_running_average is False
    finally:
        model.eval()


@pytest.fixture(scope="module")
def triple():
    model = models.create("triple_head_dual_attention_resnet18", num_classes=2,
                          rngs=nnx.Rngs(0))
    model.eval()
    return model


def test_triple_head_maps_come_from_each_heads_stage(triple):
    images = uint8_images(2)
    low = [em.grad_cam_features(triple, images, head=k) for k in range(3)]
    assert [m.shape for m in low] == [(2, 8, 8), (2, 4, 4), (2, 2, 2)]
    assert all(m.max() > 0 for m in low)
    maps = [em.grad_cam(triple, images, head=k) for k in range(3)]
    for a in range(3):
        for b in range(a + 1, 3):
            assert np.abs(maps[a] - maps[b]).max() > 0.05
    # The combined logit reaches layer4 through head 2 only (layer2 and layer3 held fixed).
    np.testing.assert_allclose(em.grad_cam_features(triple, images),
                               low[2] / 3, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(em.grad_cam(triple, images), maps[2], atol=1e-5)


def test_a_head_that_ignores_the_image_has_a_zero_map(triple):
    model = nnx.clone(triple)
    model.heads[1].fc.kernel[...] = jnp.zeros_like(model.heads[1].fc.kernel[...])
    images = uint8_images(2)
    assert np.all(em.grad_cam(model, images, head=1) == 0)
    assert em.grad_cam(model, images, head=0).max() == pytest.approx(1.0)
    assert em.grad_cam(model, images, head=2).max() == pytest.approx(1.0)


def test_grad_cam_refuses_what_it_cannot_explain(triple, converted_resnet18):
    with pytest.raises(ValueError, match="single head"):
        em.grad_cam(converted_resnet18[1], uint8_images(1), head=0)
    with pytest.raises(ValueError, match="head must be"):
        em.grad_cam(triple, uint8_images(1), head=3)
    with pytest.raises(TypeError, match="ResNet"):
        em.grad_cam(models.create("vit_tiny_patch16", image_size=32), uint8_images(1, 32))


# ---------------------------------------------------------------- spatial gates

def test_dual_attention_gate_equals_what_the_module_applies():
    model = models.create("resnet18", num_classes=2, attention="dual", rngs=nnx.Rngs(3))
    model.eval()
    images = uint8_images(2)
    gates = em.spatial_attention_maps(model, images)
    assert list(gates) == ["attention.spatial"]
    gate = gates["attention.spatial"]
    assert gate.shape == (2, SIZE, SIZE) and gate.dtype == np.float32
    assert 0 <= gate.min() and gate.max() <= 1 and gate.std() > 1e-3

    features = model.features(normalize_images(images))[-1]
    gated_input = model.attention.channel(features)
    spatial = model.attention.spatial
    # The factor the module multiplied by, read off its output (the largest channel per pixel).
    y, out = np.asarray(gated_input), np.asarray(spatial(gated_input))
    channel = np.abs(y).argmax(axis=-1)[..., None]
    applied = (np.take_along_axis(out, channel, -1) / np.take_along_axis(y, channel, -1))[..., 0]
    # The gate written out: sigmoid(conv([mean_c, max_c])).
    pooled = jnp.stack([gated_input.mean(-1), gated_input.max(-1)], axis=-1)
    direct = np.asarray(1 / (1 + jnp.exp(-spatial.conv(pooled))))[..., 0]
    np.testing.assert_allclose(applied, direct, atol=1e-5)
    np.testing.assert_allclose(gate, torch_upsample(applied, (SIZE, SIZE)), atol=1e-5)


@pytest.mark.parametrize("name,options", [
    ("resnet18", {"attention": "spatial", "placement": "stages"}),
    ("resnet18", {"attention": "cbam", "placement": "blocks"}),
    ("triple_head_dual_attention_resnet18", {"head_combine": "learned"}),
])
def test_every_spatial_gate_is_found_and_the_forward_is_unchanged(name, options):
    model = models.create(name, num_classes=2, rngs=nnx.Rngs(0), **options)
    model.eval()
    if options.get("head_combine") == "learned":
        model.head_weights[...] = jnp.array([0.5, -1.0, 2.0])
    paths = em.spatial_attention_paths(model)
    assert len(paths) == {"stages": 4, "blocks": 8}.get(options.get("placement"), 3)
    images = uint8_images(2, 32)
    logits, recorded = em.recorded_forward(model, images)
    assert sorted(recorded) == [f"{path}.gate" for path in paths]
    np.testing.assert_allclose(np.asarray(logits), np.asarray(model(normalize_images(images))),
                               atol=1e-5)
    assert all(0 <= float(g.min()) and float(g.max()) <= 1 for g in recorded.values())
    assert not nnx.state(model, nnx.Intermediate), "recording must leave the model as it was"
    assert sorted(em.spatial_attention_maps(model, images)) == paths


def test_explanations_run_the_models_own_forward(monkeypatch, converted_resnet18):
    """No shadow copy of a block's forward: change BasicBlock.__call__ and Grad-CAM, the gates
    and the recorded logits all change with it, and still agree with the changed model."""
    from her2jax.models import resnet

    _, model = converted_resnet18
    gated = models.create("resnet18", num_classes=2, attention="cbam", placement="stages",
                          rngs=nnx.Rngs(0))
    gated.eval()
    images = uint8_images(2)
    before_cam = em.grad_cam(model, images, layer=3)
    before_gates = em.spatial_attention_maps(gated, images)
    original = resnet.BasicBlock.__call__

    def without_shortcut(self, x):
        out = original(self, x)
        identity = x if self.downsample is None else self.downsample(x)
        return jax.nn.relu(out - 0.5 * identity)

    # compiled explanations are cached by shape: drop them on the way in and on the way out
    compiled = (em._grad_cam_jit, em._recorded_jit)
    for function in compiled:
        function.clear_cache()
    monkeypatch.setattr(resnet.BasicBlock, "__call__", without_shortcut)
    try:
        after_cam = em.grad_cam(model, images, layer=3)
        after_gates = em.spatial_attention_maps(gated, images)
        logits, _ = em.recorded_forward(gated, images)
        expected_logits = gated(normalize_images(images))
    finally:
        monkeypatch.undo()
        for function in compiled:
            function.clear_cache()
    assert np.abs(after_cam - before_cam).max() > 0.05
    assert max(np.abs(after_gates[k] - before_gates[k]).max() for k in before_gates) > 1e-3
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected_logits), atol=1e-5)


def test_models_without_spatial_gates_give_no_maps(converted_resnet18):
    images = uint8_images(1, 32)
    assert em.spatial_attention_maps(converted_resnet18[1], images) == {}
    channel_only = models.create("resnet18", attention="channel")
    assert em.spatial_attention_maps(channel_only, images) == {}
    assert em.spatial_attention_maps(models.create("vit_tiny_patch16", image_size=32),
                                     images) == {}


# ---------------------------------------------------------------- attention rollout

def tiny_timm_vit(pool: str) -> torch.nn.Module:
    """timm ViT (patch 8, 64 px, width 48, 3 heads, depth 2) with perturbed biases and sharper
    attention, the explicit attention path so `attn_drop` sees the softmax weights."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    net = VisionTransformer(img_size=SIZE, patch_size=8, embed_dim=48, depth=2, num_heads=3,
                            num_classes=2, global_pool=pool).eval()
    with torch.no_grad():
        for parameter in net.parameters():
            if parameter.ndim == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))
        net.cls_token.normal_(std=0.5)
        for block in net.blocks:
            block.attn.qkv.weight.mul_(4.0)
            block.attn.fused_attn = False
    return net


def numpy_rollout_matrix(attentions: list[np.ndarray], discard_ratio: float,
                         head_fusion: str) -> np.ndarray:
    """Abnar & Zuidema's rollout: fuse heads, zero the smallest entries (cls-to-cls kept),
    add I, renormalise rows, multiply through the blocks."""
    fuse = {"mean": np.mean, "max": np.max, "min": np.min}[head_fusion]
    batch, _, tokens, _ = attentions[0].shape
    result = np.broadcast_to(np.eye(tokens), (batch, tokens, tokens)).astype(np.float64)
    for weights_ in attentions:
        fused = fuse(weights_.astype(np.float64), axis=1)
        count = int(tokens * tokens * discard_ratio)
        for image in range(batch):
            flat = fused[image].reshape(-1)
            lowest = np.argsort(flat)[:count]
            flat[lowest[lowest != 0]] = 0
        augmented = fused + np.eye(tokens)
        augmented /= augmented.sum(axis=-1, keepdims=True)
        result = augmented @ result
    return result


def numpy_rollout(attentions: list[np.ndarray], pool: str, discard_ratio: float,
                  head_fusion: str, size: tuple[int, int]) -> np.ndarray:
    result = numpy_rollout_matrix(attentions, discard_ratio, head_fusion)
    batch, tokens = result.shape[:2]
    rows = result[:, 0, 1:] if pool == "token" else result[:, 1:, 1:].mean(axis=1)
    side = math.isqrt(tokens - 1)
    return by_max(torch_upsample(rows.reshape(batch, side, side), size))


@pytest.mark.parametrize("pool,discard_ratio,head_fusion", [
    ("token", 0.0, "mean"), ("avg", 0.0, "mean"), ("token", 0.5, "max")])
def test_attention_rollout_matches_timm_attention(pool, discard_ratio, head_fusion):
    net = tiny_timm_vit(pool)
    model = vit.VisionTransformer(num_classes=2, width=48, heads=3, patch_size=8, depth=2,
                                  image_size=SIZE, pool=pool, rngs=nnx.Rngs(0))
    load(model, vit.from_timm({k: v.numpy() for k, v in net.state_dict().items()}))
    model.eval()
    images = uint8_images(2)

    attentions = []
    handles = [block.attn.attn_drop.register_forward_hook(
        lambda m, i, out: attentions.append(out.detach().numpy())) for block in net.blocks]
    with torch.no_grad():
        torch_logits = net(torch_input(images)).numpy()
    for handle in handles:
        handle.remove()
    assert len(attentions) == 2 and attentions[0].shape == (2, 3, 65, 65)
    np.testing.assert_allclose(np.asarray(model(normalize_images(images))), torch_logits,
                               atol=1e-4)

    expected = numpy_rollout(attentions, pool, discard_ratio, head_fusion, (SIZE, SIZE))
    maps = em.attention_rollout(model, images, discard_ratio, head_fusion)
    assert maps.shape == (2, SIZE, SIZE) and maps.dtype == np.float32
    assert expected.std() > 0.01, "a flat reference map proves little"
    np.testing.assert_allclose(maps, expected, atol=1e-4, rtol=0)


def test_rollout_keeps_the_cls_to_cls_entry_when_discarding():
    rng = np.random.default_rng(2)
    scores = rng.uniform(1.0, 2.0, size=(3, 2, 2, 5, 5))      # blocks, batch, heads, T, T
    scores[..., 0, 0] = -1.0      # the smallest entry of every map, ~0.02: dropping it shows
    attentions = list(np.exp(scores) / np.exp(scores).sum(-1, keepdims=True))
    for ratio, fusion in [(0.0, "mean"), (0.4, "min"), (0.7, "mean")]:
        expected = numpy_rollout_matrix(attentions, ratio, fusion)
        got = np.asarray(em.rollout([jnp.asarray(a, jnp.float32) for a in attentions], ratio,
                                    fusion))
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)


def test_rollout_rejects_bad_options():
    model = models.create("vit_tiny_patch16", image_size=32)
    with pytest.raises(ValueError, match="head_fusion"):
        em.attention_rollout(model, uint8_images(1, 32), head_fusion="median")
    with pytest.raises(ValueError, match="discard_ratio"):
        em.attention_rollout(model, uint8_images(1, 32), discard_ratio=1.0)


# ---------------------------------------------------------------- overlays

def test_overlay_outlines_the_mask_and_blends_the_heat():
    image = np.full((20, 20, 3), 100, np.uint8)
    heat = np.zeros((20, 20), np.float32)
    heat[:, 10:] = 1.0
    mask = np.zeros((20, 20), bool)
    mask[5:15, 5:15] = True
    mask[0:3, 0:3] = True                                  # touches the border
    out = em.overlay(image, heat, mask, alpha=0.45, cmap="jet")
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8

    outline = np.zeros((20, 20), bool)
    outline[5:15, 5:15] = True
    outline[6:14, 6:14] = False
    outline[0:3, 0:3] = True
    outline[1, 1] = False                                  # its only interior pixel
    np.testing.assert_array_equal(em.mask_outline(mask), outline)
    assert (out[outline] == em.OUTLINE_COLOUR).all()
    assert not (out[~outline] == em.OUTLINE_COLOUR).all(axis=-1).any()

    import matplotlib
    hot = np.rint(0.55 * 100 + 0.45 * 255 * np.asarray(matplotlib.colormaps["jet"](1.0)[:3]))
    np.testing.assert_array_equal(out[18, 18], hot)
    assert np.abs(out[~outline & (heat == 1)].astype(int) - 100).max() > 40
    np.testing.assert_array_equal(em.overlay(image, heat, None, alpha=0.0), image)
    assert not np.array_equal(em.overlay(image, heat, cmap="inferno"), em.overlay(image, heat))


def test_save_overlay_png_writes_one_row_of_panels(tmp_path):
    image = uint8_images(1)[0]
    heat = np.linspace(0, 1, SIZE * SIZE, dtype=np.float32).reshape(SIZE, SIZE)
    mask = np.zeros((SIZE, SIZE), bool)
    mask[20:40, 20:40] = True
    panels = [("slice", image), ("Grad-CAM", em.overlay(image, heat, mask)),
              ("gate", heat)]
    path = tmp_path / "figures" / "patient.png"
    em.save_overlay_png(str(path), panels)
    with Image.open(path) as png:
        assert png.format == "PNG"
        width, height = png.size
        pixels = np.asarray(png.convert("RGB"))
    panel = em.PANEL_INCHES * em.PANEL_DPI
    assert 0.9 * 3 * panel <= width <= 1.1 * 3 * panel
    assert 0.9 * panel <= height <= 1.3 * panel
    assert pixels.std() > 10


# ---------------------------------------------------------------- summaries

def test_inside_fraction_and_concentration_ratio_by_hand():
    mask = np.array([[1, 0], [0, 0]], bool)
    heat = np.array([[2.0, 1.0], [1.0, 0.0]])
    assert em.inside_fraction(heat, mask) == pytest.approx(0.5)
    assert em.concentration_ratio(heat, mask) == pytest.approx(2.0 / (2.0 / 3.0))
    uniform = np.ones((2, 2))
    assert em.inside_fraction(uniform, mask) == pytest.approx(0.25)
    assert em.concentration_ratio(uniform, mask) == pytest.approx(1.0)
    assert math.isnan(em.inside_fraction(np.zeros((2, 2)), mask))
    assert math.isnan(em.concentration_ratio(np.zeros((2, 2)), mask))
    assert math.isnan(em.concentration_ratio(uniform, np.zeros((2, 2), bool)))
    assert math.isnan(em.concentration_ratio(uniform, np.ones((2, 2), bool)))
    assert em.inside_fraction(uniform, np.ones((2, 2), bool)) == 1.0
    with pytest.raises(ValueError, match="match"):
        em.inside_fraction(uniform, np.ones((3, 3), bool))
    with pytest.raises(ValueError, match="non-negative"):
        em.concentration_ratio(-uniform, mask)
