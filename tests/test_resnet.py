"""ResNets: every option builds and places its parts; layout, parameter counts and outputs equal
torchvision's, in evaluation and training mode."""
from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from flax import nnx

from her2jax import models
from her2jax.models.attention import KINDS, ChannelThenSpatial
from her2jax.models.resnet import HEADS, PLACEMENTS, from_torchvision

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
PRESETS = ("dual_attention_resnet34", "triple_head_dual_attention_resnet18")


def images(size: int, batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def randomised(name: str, **options) -> torch.nn.Module:
    """A torchvision ResNet with random weights and non-trivial BatchNorm affine and statistics
    (`options` go to the constructor, e.g. num_classes)."""
    torch.manual_seed(0)
    net = getattr(torchvision.models, name)(weights=None, **options)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.0)
            module.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


def torch_logits(net: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()


def torch_arrays(net: torch.nn.Module) -> dict[str, np.ndarray]:
    return {key: value.numpy().copy() for key, value in net.state_dict().items()}


def flat(model: nnx.Module, kind=(nnx.Param, nnx.BatchStat)) -> dict[str, nnx.Variable]:
    return {"/".join(map(str, path)): variable
            for path, variable in nnx.to_flat_state(nnx.state(model, kind))}


def load(model: nnx.Module, arrays: dict[str, np.ndarray]) -> None:
    """Sets every parameter and BatchNorm statistic; fails on a missing, extra or reshaped key."""
    variables = flat(model)
    assert sorted(arrays) == sorted(variables)
    updated = []
    for key, variable in variables.items():
        assert arrays[key].shape == variable.shape, key
        updated.append((tuple(int(p) if p.isdigit() else p for p in key.split("/")),
                        variable.replace(jnp.asarray(arrays[key]))))
    nnx.update(model, nnx.from_flat_state(updated))


def converted(name: str) -> tuple[torch.nn.Module, nnx.Module]:
    net = randomised(name)
    model = models.create(name, num_classes=1000, dropout=0.0, rngs=nnx.Rngs(1))
    load(model, from_torchvision(torch_arrays(net)))
    return net, model


def our_prefix(torch_name: str) -> str:
    """Our path prefix of a torch module: 'layer2.0.downsample.1' -> 'layer2/0/downsample/bn/'."""
    return next(iter(from_torchvision({f"{torch_name}.bias": np.zeros(1)}))).removesuffix("bias")


def parameter_count(model: nnx.Module) -> int:
    return sum(int(np.prod(v.shape)) for v in flat(model, nnx.Param).values())


def attention_sites(model: nnx.Module) -> set[str]:
    """Where attention parameters live: 'attention', 'stage_attention/2', 'layer1/0/attention'."""
    sites = set()
    for key in flat(model, nnx.Param):
        parts = key.split("/")
        first = next((i for i, part in enumerate(parts) if "attention" in part), None)
        if first is not None:
            sites.add("/".join(parts[:first + (2 if parts[first] == "stage_attention" else 1)]))
    return sites


def expected_sites(model: nnx.Module, placement: str, head: str) -> set[str]:
    if placement == "stages":
        return {f"stage_attention/{i}" for i in range(4)}
    if placement == "blocks":
        return {f"layer{stage}/{index}/attention" for stage in range(1, 5)
                for index in range(len(getattr(model, f"layer{stage}")))}
    return {"attention"} if head == "single" else {f"heads/{i}/attention" for i in range(3)}


@pytest.mark.parametrize("name", RESNETS + PRESETS)
def test_registered_models_give_logits_in_both_modes(name):
    assert name in models.names()
    model = models.create(name, num_classes=3, rngs=nnx.Rngs(0))
    for mode in (model.train, model.eval):
        mode()
        logits = model(images(32))
        assert logits.shape == (2, 3) and logits.dtype == jnp.float32
        assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("kind,placement,head", list(itertools.product(KINDS, PLACEMENTS, HEADS)))
def test_every_attention_placement_and_head(kind, placement, head):
    model = models.create("resnet18", num_classes=3, attention=kind, placement=placement,
                          head=head, rngs=nnx.Rngs(0))
    has_parameters = kind != "none"
    assert attention_sites(model) == (expected_sites(model, placement, head) if has_parameters
                                      else set())
    model.train()
    assert np.isfinite(np.asarray(model(images(32)))).all()
    model.eval()
    logits = model(images(32))
    assert logits.shape == (2, 3) and np.isfinite(np.asarray(logits)).all()


def test_presets_are_the_documented_configurations():
    third_party = nnx.eval_shape(lambda: models.create("dual_attention_resnet34",
                                                       rngs=nnx.Rngs(0)))
    assert [len(third_party.layer1), len(third_party.layer4)] == [3, 3]
    assert isinstance(third_party.attention, ChannelThenSpatial)
    assert third_party.attention.channel.pool == "avg"
    assert third_party.attention.channel.fc1.out_features == 512 // 16
    assert third_party.dropout.rate == 0.5
    triple = nnx.eval_shape(lambda: models.create("triple_head_dual_attention_resnet18",
                                                  rngs=nnx.Rngs(0)))
    assert len(triple.layer1) == 2 and len(triple.heads) == 3
    assert [h.fc.in_features for h in triple.heads] == [128, 256, 512]
    assert all(isinstance(h.attention, ChannelThenSpatial) for h in triple.heads)


@pytest.mark.parametrize("name", RESNETS)
def test_parameter_count_and_layout_equal_torchvision(name):
    net = getattr(torchvision.models, name)(weights=None)
    model = nnx.eval_shape(lambda: models.create(name, num_classes=1000, rngs=nnx.Rngs(0)))
    assert parameter_count(model) == sum(p.numel() for p in net.parameters())
    arrays = from_torchvision(torch_arrays(net))
    variables = flat(model)
    assert sorted(arrays) == sorted(variables)
    assert all(arrays[key].shape == variables[key].shape for key in arrays)


def test_from_torchvision_transposes_and_renames():
    state = {"conv1.weight": np.arange(2 * 3 * 7 * 5, dtype=np.float32).reshape(2, 3, 7, 5),
             "layer2.0.downsample.1.running_var": np.ones(4, np.float32),
             "layer2.0.downsample.1.num_batches_tracked": np.array(3),
             "fc.weight": np.arange(6, dtype=np.float32).reshape(2, 3)}
    arrays = from_torchvision(state)
    assert sorted(arrays) == ["conv1/kernel", "fc/kernel", "layer2/0/downsample/bn/var"]
    assert arrays["conv1/kernel"][6, 4, 2, 1] == state["conv1.weight"][1, 2, 6, 4]
    np.testing.assert_array_equal(arrays["fc/kernel"], state["fc.weight"].T)


@pytest.mark.parametrize("name,size", [("resnet18", 64), ("resnet50", 64), ("resnet18", 224)])
def test_converted_weights_reproduce_torchvision(name, size):
    net, model = converted(name)
    model.eval()
    x = images(size)
    np.testing.assert_allclose(np.asarray(model(x)), torch_logits(net, x), atol=1e-4, rtol=0)


def test_training_mode_uses_batch_statistics_and_updates_running_ones():
    net, model = converted("resnet18")
    before = {key: np.asarray(v) for key, v in flat(model, nnx.BatchStat).items()}
    positions = {}  # elements per channel each torch BatchNorm normalised over
    for name, module in net.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.register_forward_hook(
                lambda m, inputs, _, name=name: positions.__setitem__(
                    name, inputs[0].numel() // inputs[0].shape[1]))
    net.train()
    model.train()
    x = images(64)
    np.testing.assert_allclose(np.asarray(model(x)), torch_logits(net, x), atol=1e-4, rtol=0)
    after_torch = from_torchvision(torch_arrays(net))
    after = flat(model, nnx.BatchStat)
    assert len(after) == 2 * len(positions)
    for name, n in positions.items():
        key = our_prefix(name)
        assert not np.allclose(before[key + "mean"], after[key + "mean"][...])
        np.testing.assert_allclose(after[key + "mean"][...], after_torch[key + "mean"], atol=1e-5)
        # torch updates with the unbiased batch variance, Flax with the biased one.
        batch_variance = (after_torch[key + "var"] - 0.9 * before[key + "var"]) / 0.1 * (n - 1) / n
        np.testing.assert_allclose(after[key + "var"][...],
                                   0.9 * before[key + "var"] + 0.1 * batch_variance,
                                   atol=1e-5, rtol=1e-4)


def test_dropout_acts_in_training_only():
    model = models.create("resnet18", num_classes=3, dropout=0.5, rngs=nnx.Rngs(0))
    x = images(32)
    model.train()
    assert not np.allclose(np.asarray(model(x)), np.asarray(model(x)))
    model.eval()
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(model(x)))


def test_triple_head_combines_the_three_heads():
    x = images(32)
    for combine in ("mean", "learned"):
        model = models.create("resnet18", num_classes=3, head="triple", head_combine=combine,
                              attention="cbam", rngs=nnx.Rngs(0))
        model.eval()
        assert [h.fc.in_features for h in model.heads] == [128, 256, 512]
        stages = model.features(x)
        each = [np.asarray(head(stage)) for head, stage in zip(model.heads, stages[1:])]
        np.testing.assert_allclose(np.asarray(model(x)), np.mean(each, axis=0), atol=1e-5)
    assert isinstance(model.head_weights, nnx.Param) and model.head_weights.shape == (3,)
    model.head_weights[...] = jnp.array([0.0, 30.0, 0.0])
    np.testing.assert_allclose(np.asarray(model(x)), each[1], atol=1e-5)


def test_bfloat16_computes_in_bfloat16_with_float32_parameters():
    x = images(32)
    reference = models.create("resnet18", num_classes=3, attention="cbam", rngs=nnx.Rngs(0))
    model = models.create("resnet18", num_classes=3, attention="cbam", dtype=jnp.bfloat16,
                          rngs=nnx.Rngs(0))
    assert all(v.dtype == jnp.float32 for v in flat(model).values())
    reference.eval()
    model.eval()
    assert model.features(x)[-1].dtype == jnp.bfloat16
    logits, expected = np.asarray(model(x)), np.asarray(reference(x))
    assert logits.dtype == np.float32
    assert np.abs(logits - expected).max() < 0.05 * np.abs(expected).max() + 0.05


def test_unknown_options_fail_loudly():
    with pytest.raises(TypeError, match="colour"):
        models.create("resnet18", colour="red")
    with pytest.raises(TypeError, match="colour"):
        models.create("dual_attention_resnet34", colour="red")
    for option, value in [("attention", "se"), ("placement", "everywhere"), ("head", "double"),
                          ("head_combine", "vote")]:
        with pytest.raises(ValueError, match=f"unknown {option}"):
            models.create("resnet18", **{option: value})

