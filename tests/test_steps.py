"""The jitted train and eval steps: they learn, carry BatchNorm statistics, and give the same
result on two devices as on one."""
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
from flax import nnx

from her2jax import models
from her2jax.optim import create_optimizer
from her2jax.steps import (data_mesh, make_eval_step, make_train_step, normalize_images,
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


def test_train_step_learns_and_updates_batch_statistics():
    model = models.create("resnet18", num_classes=2, dropout=0.0, rngs=nnx.Rngs(0))
    train_graph, eval_graph, params, rest = split_model(model)
    optimizer = create_optimizer(params, learning_rate=1e-3, warmup_steps=0, total_steps=100)
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


TWO_DEVICES = textwrap.dedent("""
    import jax, numpy as np, jax.numpy as jnp
    from flax import nnx
    from her2jax import models
    from her2jax.optim import create_optimizer
    from her2jax.steps import data_mesh, make_train_step, split_model

    def fixed_batch(n=8, size=32):
        rng = np.random.default_rng(0)
        labels = np.arange(n) % 2
        images = rng.integers(0, 120, (n, size, size, 3)).astype(np.uint8)
        images[labels == 1, :, :, 1] += 100
        return {"image": jnp.asarray(images), "label": jnp.asarray(labels, jnp.int32)}

    def run(devices):
        model = models.create("resnet18", num_classes=2, dropout=0.0, rngs=nnx.Rngs(0))
        graph, _, params, rest = split_model(model)
        optimizer = create_optimizer(params, learning_rate=1e-3, warmup_steps=0,
                                     total_steps=100)
        opt_state = optimizer.init(params)
        step = make_train_step(graph, optimizer, data_mesh(devices))
        losses, norms = [], []
        for _ in range(2):
            params, rest, opt_state, metrics = step(params, rest, opt_state, fixed_batch())
            losses.append(float(metrics["loss"]))
            norms.append(float(metrics["grad_norm"]))
        return losses, norms

    assert len(jax.devices()) == 2
    one_losses, one_norms = run(jax.devices()[:1])
    two_losses, two_norms = run(jax.devices())
    # the first step starts from the same parameters: loss and gradient agree to float noise;
    # after it, Adam's division by sqrt(v) turns last-bit differences of near-zero gradients
    # (another reduction order) into parameter moves of up to lr, so the second step is looser
    np.testing.assert_allclose(two_losses[0], one_losses[0], rtol=1e-4)
    np.testing.assert_allclose(two_norms[0], one_norms[0], rtol=1e-4)
    np.testing.assert_allclose(two_losses[1], one_losses[1], rtol=1e-3)
    print("ok", one_losses)
""")


def test_two_devices_give_the_loss_of_one():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu", PYTHONPATH=root)
    result = subprocess.run([sys.executable, "-c", TWO_DEVICES], env=env, cwd=root, text=True,
                            capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok")
