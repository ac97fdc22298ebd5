"""Models by name: configs say `model.name` and keyword arguments; adding a model is one function
decorated with `@register("name")`."""
from __future__ import annotations

from typing import Any, Callable

from flax import nnx

from her2jax.errors import InvalidSetting

_MODELS: dict[str, Callable[..., nnx.Module]] = {}


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
    if name not in _MODELS:
        raise InvalidSetting(f"unknown model {name!r}; registered: {', '.join(names())}")
    return _MODELS[name](num_classes=num_classes, rngs=rngs or nnx.Rngs(0), **kwargs)


def names() -> list[str]:
    return sorted(_MODELS)
