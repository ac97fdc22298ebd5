"""The jitted train and eval steps over a ('data',) mesh: parameters replicated, batch sharded,
state donated. Pure functions of (graph, state) so one compilation serves the whole run."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from her2jax.data.augment import augment_batch
from her2jax.data.augment_options import Augment
from her2jax.models.layers import dropout_keep
from her2jax.training.losses import cross_entropy

# ImageNet statistics: the pretrained networks expect them, and the 8-bit RGB fusion exists so
# that those networks apply.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_images(images: jax.Array, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """uint8 (N, H, W, 3) -> ((x / 255) - mean) / std per channel, done on the device so the host
    sends 1 byte per pixel."""
    x = images.astype(jnp.float32) / 255.0
    return ((x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)).astype(dtype)


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.GraphDef, nnx.State, nnx.State]:
    """(train graph, eval graph, params, other state: BatchNorm statistics and RNG counters)."""
    model.train()
    train_graph, params, rest = nnx.split(model, nnx.Param, ...)
    model.eval()
    eval_graph, _, _ = nnx.split(model, nnx.Param, ...)
    model.train()
    return train_graph, eval_graph, params, rest


def make_train_step(train_graph: nnx.GraphDef,
                    optimizer: optax.GradientTransformation | Callable[[Any], Any],
                    mesh: Mesh, *, dtype: jnp.dtype = jnp.float32, label_smoothing: float = 0.0,
                    class_weights: jax.Array | None = None,
                    augment: Augment | None = None, members: bool = False,
                    member_layout: str = "vmap") -> Callable:
    """(params, rest, opt_state, batch) -> (params, rest, opt_state, metrics), jitted with the
    batch sharded over 'data' and everything else replicated; params, rest, opt_state donated.

    optimizer: a GradientTransformation, or a function of `hyper` returning one
        (`optim.factory`): the step is then (params, rest, opt_state, batch, hyper), `hyper` a
        dict of scalars (`optim.hyperparameters`, label_smoothing among them, and the model's
        dropout keep probability, 1 - rate, under "dropout_keep" if given; the class weights
        (C,) under "class_weights", in place of `class_weights`; the augmentation magnitudes of
        `Augment.magnitudes()` as "augment_<name>", in place of `augment`'s) passed as
        arguments, so one compiled step serves every value of them.

    augment: augmentation done here, on the device, before the normalisation: each image with
    its batch["augment_seed"] pair (`input_pipeline.train_iterator(augment_on="device")`).

    members: K runs in one program (with an `optimizer` function of `hyper`): every argument
        has a leading member axis (parameters, states, `hyper` values (K,), the batch (K, B,
        ...) sharded over 'data' along B), member k computing what the step without members
        computes for its slice; metrics are (K,).
    member_layout: how the members share the program (`member_layout`): "vmap" (one batched
        program: every convolution a grouped one over the members), "map" (the members' steps
        one after another inside the program, `lax.map`: each with the single run's kernels) or
        "auto" (the one measured faster on the platform). On a ('member', 'data') mesh
        (`member_mesh`) the members are spread over the member axis: parameters, states and
        `hyper` sharded along it, each member's batch over the data axis of its devices."""
    on_device = augment is not None and augment.active
    if members and not callable(optimizer):
        raise ValueError("members need the optimizer as a function of hyper (optim.factory)")

    with_hyper = callable(optimizer)

    def step(params, rest, opt_state, batch, hyper=None):
        tx = optimizer(hyper) if with_hyper else optimizer
        smoothing = hyper["label_smoothing"] if with_hyper else label_smoothing
        model = nnx.merge(train_graph, params, rest)
        images = batch["image"]
        if on_device:
            if "augment_seed" not in batch:
                raise ValueError("augmentation on the device needs batches with 'augment_seed' "
                                 "(input_pipeline.train_iterator(augment_on='device'))")
            magnitudes = {key.removeprefix("augment_"): value for key, value in
                          (hyper.items() if with_hyper else ()) if key.startswith("augment_")}
            images = augment_batch(images, batch["augment_seed"], augment, magnitudes)

        weights = hyper.get("class_weights", class_weights) if with_hyper else class_weights

        def loss_fn(model):
            # dropout, when `hyper` has it, is an argument too (a pack's members differ in it)
            with dropout_keep(hyper.get("dropout_keep") if with_hyper else None):
                logits = model(normalize_images(images, dtype))
            loss = cross_entropy(logits, batch["label"], label_smoothing=smoothing,
                                 class_weights=weights)
            return loss, logits

        # nnx.value_and_grad differentiates the Params and carries the BatchNorm updates out
        (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        _, _, new_rest = nnx.split(model, nnx.Param, ...)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": optax.tree.norm(grads)}
        return params, new_rest, opt_state, metrics

    replicated, sharded = NamedSharding(mesh, PartitionSpec()), batch_sharding(mesh)
    if members:
        step = jax.vmap(step) if member_layout_of(member_layout) == "vmap" else _mapped(step)
        sharded = NamedSharding(mesh, PartitionSpec(None, "data"))
        if "member" in mesh.axis_names:      # members spread over the devices (`member_mesh`)
            step = _spread(step, mesh)
            replicated = NamedSharding(mesh, PartitionSpec("member"))
            sharded = NamedSharding(mesh, PartitionSpec("member", "data"))
    return jax.jit(step, in_shardings=(replicated, replicated, replicated, sharded)
                   + ((replicated,) if with_hyper else ()),
                   out_shardings=(replicated, replicated, replicated, replicated),
                   donate_argnums=(0, 1, 2))


def _mapped(step: Callable) -> Callable:
    """`step` over a leading member axis of every argument, one member after another."""
    def members(*args):
        return jax.lax.map(lambda member: step(*member), args)
    return members


def _spread(step: Callable, mesh: Mesh) -> Callable:
    """`step` of K members on a ('member', 'data') mesh of M x D devices: the member axis split
    into (M, K / M), the M groups one per row of devices, each group `step` (vmap or map)."""
    groups = mesh.shape["member"]

    def spread(*args):
        def split(x):
            x = x.reshape((groups, x.shape[0] // groups) + x.shape[1:])
            free = (PartitionSpec.UNCONSTRAINED,) * (x.ndim - 1)   # a batch keeps its 'data'
            return jax.lax.with_sharding_constraint(
                x, NamedSharding(mesh, PartitionSpec("member", *free)))

        out = jax.vmap(step)(*[jax.tree.map(split, arg) for arg in args])
        return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), out)
    return spread


def member_mesh(members: int, devices: Any = None) -> Mesh:
    """A ('member', 'data') mesh over all devices for a pack of `members`: the member axis as
    long as the greatest common divisor of the member and device counts (every row of devices
    trains an equal share of the members), the data axis the rest."""
    import math

    import numpy as np

    devices = np.asarray(devices if devices is not None else jax.devices())
    rows = math.gcd(members, devices.size)
    return Mesh(devices.reshape(rows, devices.size // rows), ("member", "data"))


MEMBER_LAYOUTS = ("auto", "vmap", "map")


def member_layout_of(name: str, platform: str | None = None) -> str:
    """The layout "auto" stands for on `platform` (the default backend's): "vmap" on CPUs, where
    one batched program is faster, "map" elsewhere. On an H200 a vmapped pack of 8 dual-attention
    ResNet-18 trained at 0.48x a single run's images/s (each convolution becomes a grouped one
    over the members) and a mapped one at 0.94x (benchmarks/RESULTS.md)."""
    if name not in MEMBER_LAYOUTS:
        raise ValueError(f"member layout must be one of {MEMBER_LAYOUTS}, not {name!r}")
    if name != "auto":
        return name
    return "vmap" if (platform or jax.default_backend()) == "cpu" else "map"


def make_eval_step(eval_graph: nnx.GraphDef, mesh: Mesh, *,
                   dtype: jnp.dtype = jnp.float32) -> Callable:
    """(params, rest, batch) -> positive-class probabilities (N,), sharded like the batch."""

    def step(params, rest, batch):
        logits = nnx.merge(eval_graph, params, rest)(normalize_images(batch["image"], dtype))
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[:, 1]

    replicated, sharded = NamedSharding(mesh, PartitionSpec()), batch_sharding(mesh)
    return jax.jit(step, in_shardings=(replicated, replicated, sharded), out_shardings=sharded)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec("data"))


def data_mesh(devices: Any = None) -> Mesh:
    """A 1-D mesh named 'data' over all devices (every process's), axes of the Auto kind."""
    import numpy as np

    return Mesh(np.asarray(devices if devices is not None else jax.devices()), ("data",))
