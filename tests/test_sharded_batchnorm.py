"""BatchNorm under data parallelism: with the batch sharded over a ('data',) mesh of two devices,
jit computes global-batch statistics, exactly as one device does on the whole batch."""
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from her2jax import models

    assert len(jax.devices()) == 2, jax.devices()
    images = np.random.default_rng(0).normal(size=(8, 32, 32, 3)).astype(np.float32)
    images[:4] += 3.0          # the two halves differ: per-device statistics would differ too

    def running_means(shard, images=images):
        model = models.create("resnet18", num_classes=2, dropout=0.0, rngs=nnx.Rngs(0))
        model.train()
        graph, state = nnx.split(model)

        @jax.jit
        def step(state, x):
            model = nnx.merge(graph, state)
            logits = model(x)
            return logits, nnx.state(model)

        x = images
        if shard:
            mesh = Mesh(np.array(jax.devices()), ("data",))
            x = jax.device_put(images, NamedSharding(mesh, PartitionSpec("data")))
        logits, state = step(state, x)
        return np.asarray(logits), np.asarray(state["bn1"]["mean"][...])

    single_logits, single_mean = running_means(False)
    sharded_logits, sharded_mean = running_means(True)
    np.testing.assert_allclose(sharded_mean, single_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sharded_logits, single_logits, rtol=1e-4, atol=1e-5)
    # what one device's half alone would give: far from the global statistics
    _, half_mean = running_means(False, images[:4])
    assert np.abs(half_mean - single_mean).max() > 100 * np.abs(sharded_mean - single_mean).max()
    print("ok")
""")


def test_sharded_batch_statistics_are_global():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                            text=True, timeout=300,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok")
