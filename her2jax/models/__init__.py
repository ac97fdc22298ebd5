"""Flax NNX models: dual-attention ResNets and ViTs, by name.

    from her2jax import models
    model = models.create("resnet18", num_classes=2, attention="cbam", rngs=nnx.Rngs(0))

Inputs are NHWC float images; outputs are logits (batch, num_classes). `model.train()` and
`model.eval()` switch BatchNorm statistics, dropout and stochastic depth.
"""
from her2jax.models.registry import create, names, register
from her2jax.models import resnet  # noqa: F401  (registers the ResNets)
from her2jax.models import vit  # noqa: F401  (registers the ViTs)

__all__ = ["create", "names", "register"]
