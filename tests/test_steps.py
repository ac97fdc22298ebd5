"""The jitted train and eval steps: they learn, carry BatchNorm statistics, and give the same
result on two devices as on one."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from her2jax import models
from her2jax.training.optim import create_optimizer
from her2jax.training.steps import (data_mesh, make_eval_step, make_train_step, normalize_images,
                                    split_model)


def fixed_batch(n: int = 8, size: int = 32) -> dict:
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 2
    images = rng.integers(0, 120, (n, size, size, 3)).astype(np.uint8)
    images[labels == 1, :, :, 1] += 100          # the positive class is greener
    return {"image": jnp.asarray(images), "label": jnp.asarray(labels, jnp.int32)}


def test_normalize_images_uses_imagenet_statistics():
    images = jnp.full((1, 2, 2, 3), 255, jnp.uint8)
    expected = (1.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(normalize_images(images)[0, 0, 0], expected, rtol=1e-6)


def resnet18_and_optimizer():
    """A fresh ResNet-18 split for the steps, and the optimizer every test here uses (one
    compiled step serves them all)."""
    model = models.create("resnet18", num_classes=2, dropout=0.0, rngs=nnx.Rngs(0))
    train_graph, eval_graph, params, rest = split_model(model)
    optimizer = create_optimizer(params, learning_rate=1e-3, warmup_steps=0, total_steps=100)
    return train_graph, eval_graph, params, rest, optimizer


def test_train_step_learns_and_updates_batch_statistics():
    train_graph, eval_graph, params, rest, optimizer = resnet18_and_optimizer()
    opt_state = optimizer.init(params)
    mesh = data_mesh()
    train_step, eval_step = make_train_step(train_graph, optimizer, mesh), \
        make_eval_step(eval_graph, mesh)
    batch = fixed_batch()
    first_mean = np.asarray(rest["bn1"]["mean"][...]).copy()
    losses = []
    for _ in range(8):
        params, rest, opt_state, metrics = train_step(params, rest, opt_state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses
    assert not np.allclose(np.asarray(rest["bn1"]["mean"][...]), first_mean)
    probabilities = np.asarray(eval_step(params, rest, batch))
    assert probabilities.shape == (8,) and ((0 <= probabilities) & (probabilities <= 1)).all()


def test_train_step_augments_on_the_device_exactly_as_augment_batch():
    """make_train_step(augment=...) trains on augment_batch(images, seeds) of the batch: its
    first loss is the plain step's on the images augmented beforehand, and differs from the
    plain step's on the images as they came; without seeds it refuses, naming the fix."""
    import pytest

    from her2jax.data.augment_options import DEFAULT_AUGMENT, Augment
    from her2jax.data.augment import augment_batch

    augment = Augment.from_mapping(DEFAULT_AUGMENT)
    batch = fixed_batch()
    seeds = jnp.stack([jnp.full((8,), 5, jnp.uint32), jnp.arange(8, dtype=jnp.uint32)], 1)

    train_graph, _, params, rest, optimizer = resnet18_and_optimizer()
    plain = make_train_step(train_graph, optimizer, data_mesh())

    def first_loss(step, step_batch):
        copies = jax.tree.map(jnp.copy, (params, rest))     # the step donates its inputs
        return float(step(*copies, optimizer.init(params), step_batch)[3]["loss"])

    augmented = make_train_step(train_graph, optimizer, data_mesh(), augment=augment)
    on_device = first_loss(augmented, batch | {"augment_seed": seeds})
    images = jax.jit(augment_batch, static_argnums=2)(batch["image"], seeds, augment)
    beforehand = first_loss(plain, batch | {"image": images})
    as_they_came = first_loss(plain, batch)
    # a few pixels may round the other way inside the compiled step: a loss within 1e-3
    assert on_device == pytest.approx(beforehand, rel=1e-3)
    assert abs(on_device - as_they_came) > 10 * abs(on_device - beforehand)
    with pytest.raises(ValueError, match="augment_on='device'"):
        first_loss(augmented, batch)


def augmented_batch(n: int = 8, size: int = 32) -> dict:
    """fixed_batch with per-example augmentation seeds."""
    seeds = np.stack([np.full(n, 3), np.arange(n)], 1).astype(np.uint32)
    return fixed_batch(n, size) | {"augment_seed": jnp.asarray(seeds)}


def two_augmented_steps(devices=None) -> tuple[list[float], list[float]]:
    """Losses and gradient norms of two augmented train steps over `devices`."""
    from her2jax.data.augment_options import DEFAULT_AUGMENT, Augment

    graph, _, params, rest, optimizer = resnet18_and_optimizer()
    opt_state = optimizer.init(params)
    step = make_train_step(graph, optimizer, data_mesh(devices),
                           augment=Augment.from_mapping(DEFAULT_AUGMENT))
    losses, norms = [], []
    for _ in range(2):
        params, rest, opt_state, metrics = step(params, rest, opt_state, augmented_batch())
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
    return losses, norms


TWO_DEVICES = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from test_steps import two_augmented_steps

    assert len(jax.devices()) == 2
    # the step with its augmentation, each device augmenting its half of the batch from the
    # per-example seeds: the same images as on one device, so the same losses
    one_losses, one_norms = json.loads(sys.argv[1])
    two_losses, two_norms = two_augmented_steps(jax.devices())
    # the first step starts from the same parameters: loss and gradient agree to float noise;
    # after it, Adam's division by sqrt(v) turns last-bit differences of near-zero gradients
    # (another reduction order) into parameter moves of up to lr, so the second step is looser
    np.testing.assert_allclose(two_losses[0], one_losses[0], rtol=1e-4)
    np.testing.assert_allclose(two_norms[0], one_norms[0], rtol=1e-4)
    np.testing.assert_allclose(two_losses[1], one_losses[1], rtol=2e-3)   # 4.7e-4 measured
    print("ok", one_losses, two_losses)
""")


def test_two_devices_give_the_loss_of_one():
    """The step with its on-device augmentation, the widest form, on this process's one device,
    then on two in a process that has two: the plain step's two-device loss is checked by
    test_scaling_bench (first loss) and test_train (a run resumed onto two devices), and that
    augmentation changes the loss by test_train_step_augments_on_the_device_exactly_as_augment_
    batch."""
    import json

    one = two_augmented_steps(jax.devices()[:1])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([root, os.path.join(root, "tests")]))
    result = subprocess.run([sys.executable, "-c", TWO_DEVICES, json.dumps(one)], env=env,
                            cwd=root, text=True, capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok")
