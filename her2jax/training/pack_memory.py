"""How many runs fit in one pack, from the memory analysis of the compiled packed step.

`step_bytes(config, image_size, members)` compiles the train step for that many members from
shapes alone (nothing is initialised or run) and returns what XLA says it needs: arguments,
outputs and temporaries, less what donation lets outputs reuse. `pack_size` measures one and
two members (the difference is one member's share, the rest is shared) and fits as many members
as a memory budget allows beside the resident splits.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from her2jax import models
from her2jax.data.augment_options import Augment
from her2jax.errors import InvalidSetting
from her2jax.models.layers import dropout_rates
from her2jax.training import optim, steps

HEADROOM = 0.9        # of the free memory: the allocator's fragmentation, the evaluation step


_MEASURED: dict[tuple[str, int, int], int] = {}


def step_bytes(config: Any, image_size: int, members: int) -> int:
    """Bytes the compiled train step of `members` runs of `config` needs on one device
    (measured once per config, size and member count in a process)."""
    key = (config.to_json(), image_size, members)
    if key not in _MEASURED:
        _MEASURED[key] = _step_bytes(config, image_size, members)
    return _MEASURED[key]


def _step_bytes(config: Any, image_size: int, members: int) -> int:
    model = nnx.eval_shape(lambda: models.from_config(config, image_size))
    graph, _, params, rest = steps.split_model(model)
    values = {key: np.float32(value) for key, value in optim.hyperparameters(config).items()}
    if len(dropout_rates(model)) == 1:
        values["dropout_keep"] = np.float32(0.5)
    factory = optim.factory(config, params)
    opt_state = jax.eval_shape(factory(values).init, params)
    mesh = steps.data_mesh(jax.local_devices()[:1])
    batch = {"image": jax.ShapeDtypeStruct((config.batch_size, image_size, image_size, 3),
                                           jnp.uint8),
             "label": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32),
             "augment_seed": jax.ShapeDtypeStruct((config.batch_size, 2), jnp.uint32)}
    hyper = {key: jax.ShapeDtypeStruct((), jnp.float32) for key in values}

    def shaped(tree):
        lead = (members,) if members > 1 else ()
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(lead + tuple(x.shape), x.dtype), tree)

    step = steps.make_train_step(
        graph, factory, mesh, dtype=jnp.dtype(config.dtype), members=members > 1,
        member_layout=config.get("pack_layout", "auto"),
        augment=Augment.from_mapping(config.input.augment.to_dict()))
    compiled = step.lower(shaped(params), shaped(rest), shaped(opt_state), shaped(batch),
                          shaped(hyper)).compile()
    memory = compiled.memory_analysis()
    return int(memory.argument_size_in_bytes + memory.output_size_in_bytes
               + memory.temp_size_in_bytes - memory.alias_size_in_bytes)


def pack_size(config: Any, image_size: int, free: int, resident: int, limit: int) -> int:
    """Members of `config` that fit in `free` bytes of one device (HEADROOM of it) beside
    `resident` bytes of data, at most `limit`; refused when not even one fits."""
    one, two = step_bytes(config, image_size, 1), step_bytes(config, image_size, 2)
    member = max(two - one, 1)
    shared = max(one - member, 0)
    budget = int(HEADROOM * free) - resident - shared
    if budget < member:
        raise InvalidSetting(
            f"--pack auto: one run needs about {one + resident} bytes of device memory (step "
            f"{one}, data {resident}) and {free} are free")
    return max(1, min(limit, budget // member))
