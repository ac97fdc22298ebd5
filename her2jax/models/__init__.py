"""Flax NNX models: dual-attention ResNets and ViTs, by name.

    from her2jax import models
    model = models.create("resnet18", num_classes=2, attention="cbam", rngs=nnx.Rngs(0))

Inputs are NHWC float images; outputs are logits (batch, num_classes). `model.train()` and
`model.eval()` switch BatchNorm statistics, dropout and stochastic depth.
"""
from her2jax.models.registry import create, names, register

__all__ = ["create", "from_config", "names", "register"]


def from_config(config, image_size: int):
    """The model a run's config describes: `config.model.name` with `config.model.kwargs`,
    `config.num_classes` outputs, compute dtype `config.dtype`, initialised from `config.seed`;
    ViTs and Swin are built for `image_size` unless the kwargs say otherwise."""
    import jax.numpy as jnp
    from flax import nnx

    kwargs = dict(config.model.kwargs)
    if config.model.name.startswith(("vit", "swin")):
        kwargs.setdefault("image_size", image_size)
    return create(config.model.name, num_classes=config.num_classes,
                  rngs=nnx.Rngs(config.seed), dtype=jnp.dtype(config.dtype), **kwargs)
