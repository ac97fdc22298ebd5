"""The optimiser: AdamW with linear warm-up and cosine decay, gradient clipping, weight decay only
on weight matrices and kernels, a learning-rate multiplier for a pretrained backbone, and
optional gradient accumulation."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

# Parameters that start fresh when a pretrained backbone is loaded: heads and attention modules.
NEW_PART_NAMES = frozenset({"fc", "head", "heads", "head_weights", "attention", "stage_attention"})
# timm's no-weight-decay set for ViTs, besides every one-dimensional parameter.
NO_DECAY_NAMES = frozenset({"pos_embed", "cls_token", "relative_position_bias_table"})


def learning_rate_schedule(base: float | Any, warmup_steps: int, total_steps: int,
                           final_fraction: float = 0.0) -> optax.Schedule:
    """lr(t) = base t / warmup for t < warmup, then
    base (f + (1 - f) (1 + cos(pi (t - warmup) / (total - warmup))) / 2), f = final_fraction.

    `base` multiplies a schedule of peak 1, so it may be a traced array (a compiled step that
    takes the learning rate as an argument)."""
    if total_steps <= warmup_steps:
        raise ValueError(f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps})")
    unit = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=1.0, warmup_steps=warmup_steps, decay_steps=total_steps,
        end_value=final_fraction)
    return lambda count: base * unit(count)


def _names(path) -> list[str]:
    return [str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))
            for key in path]


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: parameters of rank >= 2 except position embeddings and
    the class token; never biases, BatchNorm/LayerNorm scales or head weights of rank 1."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x.ndim >= 2 and not NO_DECAY_NAMES & set(_names(path)), params)


def learning_rate_multipliers(params: Any, backbone_multiplier: float) -> Any:
    """`backbone_multiplier` for pretrained backbone parameters, 1 for heads and attention."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: 1.0 if NEW_PART_NAMES & set(_names(path)) else backbone_multiplier,
        params)


def _scale_per_parameter(multipliers: Any) -> optax.GradientTransformation:
    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, multipliers), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def create_optimizer(params: Any, *, learning_rate: float, warmup_steps: int, total_steps: int,
                     weight_decay: float = 0.05, grad_clip_norm: float | None = 1.0,
                     b1: float = 0.9, b2: float = 0.999, backbone_multiplier: float = 1.0,
                     accumulation_steps: int = 1) -> optax.GradientTransformation:
    """clip(global norm) -> AdamW(schedule, decay mask) -> per-parameter lr multiplier, wrapped in
    `optax.MultiSteps` when gradients are accumulated over several micro-batches.

    The multiplier scales the whole AdamW step (decay included), i.e. the backbone's learning
    rate; `total_steps` counts optimiser updates, not micro-batches.
    """
    parts = []
    if grad_clip_norm:
        parts.append(optax.clip_by_global_norm(grad_clip_norm))
    schedule = learning_rate_schedule(learning_rate, warmup_steps, total_steps)
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay,
                             mask=decay_mask(params)))
    if backbone_multiplier != 1.0:
        parts.append(_scale_per_parameter(learning_rate_multipliers(params, backbone_multiplier)))
    optimizer = optax.chain(*parts)
    if accumulation_steps > 1:
        optimizer = optax.MultiSteps(optimizer, every_k_schedule=accumulation_steps)
    return optimizer


# The settings a compiled train step takes as arguments rather than constants
# (`hyperparameters`, `factory`): runs that differ only in them share one executable.
HYPERPARAMETERS = ("learning_rate", "weight_decay", "b1", "b2", "label_smoothing")


def hyperparameters(config: Any) -> dict[str, float]:
    """The run's values of HYPERPARAMETERS (`config.optimizer.*`, `config.loss.label_smoothing`)."""
    values = {key: float(config.optimizer[key]) for key in HYPERPARAMETERS[:4]}
    values["label_smoothing"] = float(config.loss.label_smoothing)
    return values


def warmup_of(config: Any) -> int:
    """The run's warm-up in steps: `warmup_steps` when it is >= 0, else `warmup_fraction` (a
    run recorded before it existed: 0.05) of `total_steps`, rounded, and below `total_steps`."""
    if config.warmup_steps >= 0:
        return int(config.warmup_steps)
    fraction = config.get("warmup_fraction", 0.05)
    return max(0, min(config.total_steps - 1, int(round(fraction * config.total_steps))))


def factory(config: Any, params: Any) -> Any:
    """hyper -> `create_optimizer` with the config's other settings and the learning rate, weight
    decay and betas of `hyper` (scalars, traced inside a compiled step). The optimiser state has
    the structure of `from_config`'s."""
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)

    def build(hyper: Any) -> optax.GradientTransformation:
        return create_optimizer(
            shapes, learning_rate=hyper["learning_rate"], warmup_steps=warmup_of(config),
            total_steps=config.total_steps, weight_decay=hyper["weight_decay"],
            grad_clip_norm=config.optimizer.grad_clip_norm or None, b1=hyper["b1"],
            b2=hyper["b2"], backbone_multiplier=config.optimizer.backbone_multiplier,
            accumulation_steps=config.optimizer.accumulation_steps)

    return build


def from_config(config: Any, params: Any) -> optax.GradientTransformation:
    """`create_optimizer` with a run config's settings (`config.optimizer`, warm-up and length)."""
    return create_optimizer(
        params, learning_rate=config.optimizer.learning_rate,
        warmup_steps=warmup_of(config), total_steps=config.total_steps,
        weight_decay=config.optimizer.weight_decay,
        grad_clip_norm=config.optimizer.grad_clip_norm or None, b1=config.optimizer.b1,
        b2=config.optimizer.b2, backbone_multiplier=config.optimizer.backbone_multiplier,
        accumulation_steps=config.optimizer.accumulation_steps)
