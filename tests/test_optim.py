"""Optimiser and loss against independent references (torch AdamW and cross_entropy, sklearn)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from sklearn.utils.class_weight import compute_class_weight

from her2jax import models
from her2jax.training.losses import class_weights_from_counts, cross_entropy
from her2jax.training.optim import (create_optimizer, decay_mask, learning_rate_multipliers,
                                    learning_rate_schedule)


def test_schedule_follows_the_formula():
    schedule = learning_rate_schedule(1e-3, warmup_steps=10, total_steps=110, final_fraction=0.1)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(5e-4)
    for t in (10, 35, 60, 110):
        expected = 1e-3 * (0.1 + 0.9 * (1 + math.cos(math.pi * (t - 10) / 100)) / 2)
        assert float(schedule(t)) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="must exceed"):
        learning_rate_schedule(1e-3, warmup_steps=10, total_steps=10)


def by_path(tree) -> dict:
    """'conv1/kernel' -> leaf, for a tree of Variables holding plain values."""
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", ""))) for k in path[:-1]): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_decay_mask_spares_biases_norms_and_vit_tokens():
    resnet = nnx.state(models.create("resnet18", num_classes=2, attention="cbam",
                                     rngs=nnx.Rngs(0)), nnx.Param)
    for path, (decay, param) in zip(nnx.to_flat_state(resnet),
                                    zip(jax.tree.leaves(decay_mask(resnet)),
                                        jax.tree.leaves(resnet))):
        assert decay == (param.ndim >= 2), path
    vit = nnx.state(models.create("vit_tiny_patch16", num_classes=2, image_size=32,
                                  rngs=nnx.Rngs(0)), nnx.Param)
    mask = by_path(decay_mask(vit))
    assert not mask["pos_embed"] and not mask["cls_token"]
    assert mask["blocks/0/attn/qkv/kernel"] and not mask["blocks/0/norm1/scale"]


def test_backbone_multiplier_covers_the_backbone_only():
    model = models.create("resnet18", num_classes=2, head="triple", head_combine="learned",
                          attention="channel", rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    multipliers = by_path(learning_rate_multipliers(params, 0.1))
    assert multipliers["conv1/kernel"] == 0.1 and multipliers["layer4/1/bn2/scale"] == 0.1
    assert all(v == 1.0 for k, v in multipliers.items() if k.startswith("heads/"))
    assert multipliers["head_weights"] == 1.0


def test_adamw_steps_match_torch():
    rng = np.random.default_rng(0)
    weight, bias = rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    grads = [(rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32))
             for _ in range(3)]
    params = {"kernel": jnp.asarray(weight), "bias": jnp.asarray(bias)}
    optimizer = create_optimizer(params, learning_rate=1e-2, warmup_steps=0, total_steps=1000,
                                 weight_decay=0.1, grad_clip_norm=None)
    state = optimizer.init(params)
    schedule = learning_rate_schedule(1e-2, 0, 1000)
    torch_weight = torch.nn.Parameter(torch.from_numpy(weight.copy()))
    torch_bias = torch.nn.Parameter(torch.from_numpy(bias.copy()))
    reference = torch.optim.AdamW([{"params": [torch_weight], "weight_decay": 0.1},
                                   {"params": [torch_bias], "weight_decay": 0.0}], lr=1e-2,
                                  eps=1e-8)
    for step, (g_weight, g_bias) in enumerate(grads):
        updates, state = optimizer.update({"kernel": jnp.asarray(g_weight),
                                           "bias": jnp.asarray(g_bias)}, state, params)
        params = optax.apply_updates(params, updates)
        for group in reference.param_groups:
            group["lr"] = float(schedule(step))
        torch_weight.grad, torch_bias.grad = torch.from_numpy(g_weight), torch.from_numpy(g_bias)
        reference.step()
    np.testing.assert_allclose(params["kernel"], torch_weight.detach().numpy(), atol=1e-6)
    np.testing.assert_allclose(params["bias"], torch_bias.detach().numpy(), atol=1e-6)


def test_multiplier_scales_backbone_updates():
    params = {"conv1": {"kernel": jnp.ones((2, 2))}, "fc": {"kernel": jnp.ones((2, 2))}}
    grads = jax.tree.map(lambda x: 0.5 * x, params)
    plain = create_optimizer(params, learning_rate=1e-2, warmup_steps=0, total_steps=100,
                             grad_clip_norm=None)
    slow = create_optimizer(params, learning_rate=1e-2, warmup_steps=0, total_steps=100,
                            grad_clip_norm=None, backbone_multiplier=0.1)
    u_plain, _ = plain.update(grads, plain.init(params), params)
    u_slow, _ = slow.update(grads, slow.init(params), params)
    np.testing.assert_allclose(u_slow["conv1"]["kernel"], 0.1 * u_plain["conv1"]["kernel"],
                               rtol=1e-6)
    np.testing.assert_allclose(u_slow["fc"]["kernel"], u_plain["fc"]["kernel"], rtol=1e-6)


def test_accumulation_equals_the_mean_gradient():
    params = {"kernel": jnp.ones((3, 2))}
    g1, g2 = {"kernel": jnp.full((3, 2), 0.2)}, {"kernel": jnp.full((3, 2), -0.6)}
    kwargs = dict(learning_rate=1e-2, warmup_steps=0, total_steps=100, grad_clip_norm=1.0)
    accumulated = create_optimizer(params, accumulation_steps=2, **kwargs)
    state = accumulated.init(params)
    first, state = accumulated.update(g1, state, params)
    assert float(jnp.abs(first["kernel"]).max()) == 0.0        # no step on the first micro-batch
    second, _ = accumulated.update(g2, state, params)
    single = create_optimizer(params, **kwargs)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
    expected, _ = single.update(mean, single.init(params), params)
    np.testing.assert_allclose(second["kernel"], expected["kernel"], rtol=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_matches_torch(smoothing, weighted):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(9, 2)).astype(np.float32) * 3
    labels = rng.integers(0, 2, 9)
    weights = np.array([0.6, 2.5], np.float32) if weighted else None
    expected = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits), torch.from_numpy(labels),
        weight=None if weights is None else torch.from_numpy(weights),
        label_smoothing=smoothing).item()
    ours = cross_entropy(jnp.asarray(logits), jnp.asarray(labels), label_smoothing=smoothing,
                         class_weights=None if weights is None else jnp.asarray(weights))
    assert float(ours) == pytest.approx(expected, rel=1e-6)


def test_padding_does_not_count():
    logits = jnp.asarray([[2.0, -1.0], [0.5, 0.5], [9.0, -9.0]])
    labels = jnp.asarray([0, 1, 1])
    valid = jnp.asarray([True, True, False])
    assert float(cross_entropy(logits, labels, valid=valid)) == pytest.approx(
        float(cross_entropy(logits[:2], labels[:2])))


def test_class_weights_are_sklearns_balanced_weights():
    labels = np.array([0] * 78 + [1] * 22)
    np.testing.assert_allclose(class_weights_from_counts(np.bincount(labels)),
                               compute_class_weight("balanced", classes=np.array([0, 1]), y=labels),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="every class"):
        class_weights_from_counts(np.array([10, 0]))


def assert_trees_close(a, b, rtol=1e-5):
    """Each leaf within `rtol` of the other relative to its norm (random keys: equal)."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            np.testing.assert_array_equal(jax.random.key_data(x), jax.random.key_data(y))
            continue
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert np.linalg.norm(x - y) <= rtol * max(np.linalg.norm(y), 1e-12), (x, y)


class Tiny(nnx.Module):
    """A classifier of 4x4 images with BatchNorm and dropout (state and random keys of its own
    beside the parameters): a train step that compiles in a moment. No bias before the norm: its
    gradient would be rounding noise, which Adam scales up to full-size steps."""

    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(48, 8, use_bias=False, rngs=rngs)   # no bias before a norm
        self.norm = nnx.BatchNorm(8, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.out = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(self.dropout(nnx.relu(self.norm(self.hidden(x.reshape(x.shape[0], -1))))))


def test_one_compiled_step_serves_every_learning_rate_decay_beta_and_smoothing():
    """The loop's train step takes optim.HYPERPARAMETERS as arguments: two runs that differ in all
    of them lower to the same program, and each trains as the step with its values built in."""
    from configs import resnet
    from her2jax.training import optim, steps

    def config(learning_rate, weight_decay, b1, b2, smoothing):
        c = resnet.get_config("resnet18,runlocal")
        c.optimizer.learning_rate, c.optimizer.weight_decay = learning_rate, weight_decay
        c.optimizer.b1, c.optimizer.b2, c.loss.label_smoothing = b1, b2, smoothing
        c.warmup_steps, c.total_steps = 1, 5
        return c

    graph, _, params, rest = steps.split_model(Tiny(nnx.Rngs(0)))
    mesh = steps.data_mesh()
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.integers(0, 255, (4, 4, 4, 3), np.uint8)),
             "label": jnp.asarray([0, 1, 1, 0], jnp.int32)}
    first, second = config(1e-2, 0.05, 0.9, 0.999, 0.0), config(3e-3, 0.3, 0.8, 0.99, 0.1)
    assert set(optim.hyperparameters(first)) == set(optim.HYPERPARAMETERS)
    step = steps.make_train_step(graph, optim.factory(first, params), mesh)
    opt_state = optim.factory(first, params)(optim.hyperparameters(first)).init(params)
    assert jax.tree.structure(opt_state) == jax.tree.structure(
        optim.from_config(first, params).init(params))      # checkpoints keep their layout
    hyper = {"first": {k: np.float32(v) for k, v in optim.hyperparameters(first).items()},
             "second": {k: np.float32(v) for k, v in optim.hyperparameters(second).items()}}
    texts = {name: step.lower(params, rest, opt_state, batch, values).as_text()
             for name, values in hyper.items()}
    assert texts["first"] == texts["second"]
    for name, c in (("first", first), ("second", second)):
        built_in = steps.make_train_step(graph, optim.from_config(c, params), mesh,
                                         label_smoothing=c.loss.label_smoothing)
        a = b = (params, rest, optim.from_config(c, params).init(params))
        for _ in range(3):
            a = step(*jax.tree.map(jnp.copy, a), batch, hyper[name])[:3]
            b = built_in(*jax.tree.map(jnp.copy, b), batch)[:3]
        assert_trees_close(a[:2], b[:2])         # parameters, BatchNorm statistics, keys
        assert_trees_close(a[2], b[2], rtol=1e-4)  # Adam's moments: squares of gradients


@pytest.mark.parametrize("layout", ["vmap", "map"])
def test_members_of_one_step_train_as_their_runs_alone(layout):
    """steps.make_train_step(members=True) in either member layout: two runs with their own
    initialisation, batches and hyper-parameters stacked on a member axis; after three steps each
    member's parameters and optimiser state equal those of its run trained alone, to 1e-5."""
    from configs import resnet
    from her2jax.training import optim, steps

    config = resnet.get_config("resnet18,runlocal")
    config.warmup_steps, config.total_steps = 1, 5
    mesh = steps.data_mesh()
    runs = []
    rng = np.random.default_rng(1)
    for seed, (learning_rate, smoothing) in enumerate(((1e-2, 0.0), (3e-3, 0.2))):
        graph, _, params, rest = steps.split_model(Tiny(nnx.Rngs(seed)))
        config.optimizer.learning_rate, config.loss.label_smoothing = learning_rate, smoothing
        hyper = {k: np.float32(v) for k, v in optim.hyperparameters(config).items()}
        opt_state = optim.factory(config, params)(hyper).init(params)
        batches = [{"image": jnp.asarray(rng.integers(0, 255, (4, 4, 4, 3), np.uint8)),
                    "label": jnp.asarray(rng.integers(0, 2, 4), jnp.int32)} for _ in range(3)]
        runs.append(dict(state=(params, rest, opt_state), hyper=hyper, batches=batches))
    factory = optim.factory(config, runs[0]["state"][0])
    alone = steps.make_train_step(graph, factory, mesh)
    packed = steps.make_train_step(graph, factory, mesh, members=True, member_layout=layout)

    def stack(*trees):
        return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)

    state = stack(*[run["state"] for run in runs])
    hyper = stack(*[run["hyper"] for run in runs])
    for t in range(3):
        *state, metrics = packed(*state, stack(*[run["batches"][t] for run in runs]), hyper)
        assert metrics["loss"].shape == (2,)
    for k, run in enumerate(runs):
        single = run["state"]
        for t in range(3):
            single = alone(*jax.tree.map(jnp.copy, single), run["batches"][t], run["hyper"])[:3]
        member = jax.tree.map(lambda a: a[k], state)
        assert_trees_close(member[:2], single[:2])
        assert_trees_close(member[2], single[2], rtol=1e-4)
    with pytest.raises(ValueError, match="function of hyper"):
        steps.make_train_step(graph, optax.sgd(0.1), mesh, members=True)


def test_members_differ_in_augmentation_magnitudes_and_class_weights_as_their_runs_alone():
    """A pack's members may differ in the augmentation magnitudes and class weights, passed as
    step arguments (`hyper["augment_*"]`, `hyper["class_weights"]`; ones for an unweighted
    member): each member equals its run alone, built with the constants, after two steps."""
    from configs import resnet
    from her2jax.data.augment_options import Augment
    from her2jax.training import optim, steps

    config = resnet.get_config("resnet18,runlocal")
    config.warmup_steps, config.total_steps = 1, 5
    mesh = steps.data_mesh()
    rng = np.random.default_rng(2)
    members = [(Augment(flip=0.5, rotate_degrees=30.0, intensity_jitter=0.2),
                np.asarray([0.6, 1.7], np.float32)),
               (Augment(flip=0.1, rotate_degrees=5.0, intensity_jitter=0.05), None)]
    graph, _, params, rest = steps.split_model(Tiny(nnx.Rngs(0)))
    hyper = {k: np.float32(v) for k, v in optim.hyperparameters(config).items()}
    factory = optim.factory(config, params)
    opt_state = factory(hyper).init(params)
    batches = [{"image": jnp.asarray(rng.integers(0, 255, (2, 4, 4, 4, 3), np.uint8)),
                "label": jnp.asarray(rng.integers(0, 2, (2, 4)), jnp.int32),
                "augment_seed": jnp.asarray(rng.integers(0, 2**31, (2, 4, 2)), jnp.uint32)}
               for _ in range(2)]
    hypers = [{**hyper, **{f"augment_{k}": np.float32(v) for k, v in augment.magnitudes().items()},
               "class_weights": np.ones(2, np.float32) if weights is None else weights}
              for augment, weights in members]
    packed = steps.make_train_step(graph, factory, mesh, members=True, augment=members[0][0])
    state = jax.tree.map(lambda x: jnp.stack([x, x]), (params, rest, opt_state))
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *hypers)
    for batch in batches:
        *state, _ = packed(*state, batch, stacked)
    for k, (augment, weights) in enumerate(members):
        alone = steps.make_train_step(graph, factory, mesh, augment=augment,
                                      class_weights=None if weights is None
                                      else jnp.asarray(weights))
        single = (params, rest, opt_state)
        for batch in batches:
            single = alone(*jax.tree.map(jnp.copy, single), jax.tree.map(lambda x: x[k], batch),
                           hyper)[:3]
        member = jax.tree.map(lambda a: a[k], state)
        assert_trees_close(member[:2], single[:2])
        assert_trees_close(member[2], single[2], rtol=1e-4)
    # the magnitudes matter: member 1's run with member 0's augmentation ends elsewhere
    other = steps.make_train_step(graph, factory, mesh, augment=members[0][0])
    single = (params, rest, opt_state)
    for batch in batches:
        single = other(*jax.tree.map(jnp.copy, single), jax.tree.map(lambda x: x[1], batch),
                       hyper)[:3]
    assert not np.allclose(jax.tree.leaves(single[0])[0],
                           jax.tree.leaves(jax.tree.map(lambda a: a[1], state[0]))[0])


def test_auto_member_layout_is_vmap_on_cpus_and_map_elsewhere():
    from her2jax.training import steps

    assert steps.member_layout_of("auto", "cpu") == "vmap"
    assert steps.member_layout_of("auto", "gpu") == "map"
    assert steps.member_layout_of("map", "cpu") == "map"
    with pytest.raises(ValueError, match="member layout"):
        steps.member_layout_of("grouped")


def test_the_default_warm_up_is_a_fraction_of_the_run_and_explicit_steps_must_fit():
    """A short run needs no second flag; warmup_steps given in steps is still checked."""
    from configs import resnet
    from her2jax.errors import InvalidSetting
    from her2jax.training import loop, optim

    config = resnet.get_config("resnet18")
    assert config.warmup_steps == -1
    config.total_steps = 30
    loop.check_config(config)                          # --config.total_steps=30 alone
    assert optim.warmup_of(config) == 2                # round(0.05 * 30)
    config.total_steps = 2000
    assert optim.warmup_of(config) == 100
    config.total_steps, config.warmup_fraction = 3, 0.9
    assert optim.warmup_of(config) == 2                # below total_steps, whatever the fraction
    config.warmup_fraction, config.warmup_steps, config.total_steps = 0.05, 40, 30
    with pytest.raises(InvalidSetting, match=r"warmup_steps \(40\) must be in \[0, total_steps"):
        loop.check_config(config)
    config.warmup_steps = 10
    loop.check_config(config)
    assert optim.warmup_of(config) == 10
    config.warmup_steps, config.warmup_fraction = -1, 1.5
    with pytest.raises(InvalidSetting, match="warmup_fraction"):
        loop.check_config(config)
    # a run recorded before warmup_fraction existed: 5%
    del config["warmup_fraction"]
    config.total_steps = 200
    assert optim.warmup_of(config) == 10
