"""Models by name: configs say `model.name` and keyword arguments; adding a model is one function
decorated with `@register("name")`. The built-in families register themselves when first asked
for, so that importing `her2jax.models.presets` (the configs do) does not load JAX."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable

from her2jax.errors import InvalidSetting

if TYPE_CHECKING:
    from flax import nnx

BUILT_IN = ("her2jax.models.resnet", "her2jax.models.vit", "her2jax.models.cvt",
            "her2jax.models.swin")
_MODELS: dict[str, Callable[..., nnx.Module]] = {}


def _load_built_in() -> None:
    for module in BUILT_IN:
        importlib.import_module(module)   # registers its models (once: imports are cached)


def register(name: str) -> Callable:
    """Decorator: `@register("resnet18")` on a function `(*, num_classes, rngs, **kwargs)`."""

    def add(factory: Callable[..., nnx.Module]) -> Callable[..., nnx.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} registered twice")
        _MODELS[name] = factory
        return factory

    return add


def create(name: str, *, num_classes: int = 2, rngs: nnx.Rngs | None = None,
           **kwargs: Any) -> nnx.Module:
    """Builds a registered model; unknown names and keyword arguments fail with the valid ones."""
    _load_built_in()
    if name not in _MODELS:
        raise InvalidSetting(f"unknown model {name!r}; registered: {', '.join(names())}")
    if rngs is None:
        from flax import nnx

        rngs = nnx.Rngs(0)
    return _MODELS[name](num_classes=num_classes, rngs=rngs, **kwargs)


def names() -> list[str]:
    _load_built_in()
    return sorted(_MODELS)
