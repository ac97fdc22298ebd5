"""Several processes, one job: starting `jax.distributed` and gathering host-side results.

`initialize(mode)` is called by the command-line tools before any JAX computation:
    off    one process (whatever the environment says)
    auto   a multi-process job when the environment describes one: explicit settings (flags or
           JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID), a SLURM step or an
           Open MPI job with several tasks, a GKE TPU slice with several hosts; else one process
    on     always; settings not given are detected by JAX (Cloud TPU VMs of a pod slice read
           them from the metadata server: use `--multihost=on` there)
On CPU the collectives go through gloo, so several processes on one machine (or a CPU cluster)
train together; this is how the tests exercise the multi-process code.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from her2jax.errors import InvalidSetting, ToolFailed

MODES = ("auto", "on", "off")


def detect(environ: Mapping[str, str] | None = None) -> str | None:
    """Which multi-process environment `environ` describes: 'explicit', 'slurm', 'openmpi',
    'tpu' or None (one process)."""
    env = os.environ if environ is None else environ
    if all(env.get(k) for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
                                "JAX_PROCESS_ID")):
        return "explicit"
    if env.get("SLURM_JOB_ID") and _int(env.get("SLURM_STEP_NUM_TASKS",
                                                 env.get("SLURM_NTASKS", "1"))) > 1:
        return "slurm"
    if _int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "openmpi"
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return "tpu"
    return None


def initialize(mode: str = "auto", *, coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               environ: Mapping[str, str] | None = None) -> str | None:
    """Starts the multi-process runtime when `mode` and the environment ask for it; returns what
    was detected ('explicit', 'slurm', ...) or None for a single process."""
    import jax

    if mode not in MODES:
        raise InvalidSetting(f"multihost mode {mode!r}; choose from {MODES}")
    env = os.environ if environ is None else environ
    explicit = [coordinator_address, num_processes, process_id]
    if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
        raise InvalidSetting("--coordinator_address, --num_processes and --process_id go together")
    if all(v is not None for v in explicit):
        kind = "explicit"
    elif mode == "off":
        return None
    else:
        kind = detect(env)
        if kind == "explicit":
            coordinator_address = env["JAX_COORDINATOR_ADDRESS"]
            num_processes = _int(env["JAX_NUM_PROCESSES"])
            process_id = _int(env["JAX_PROCESS_ID"])
        elif kind is None and mode == "auto":
            return None
    if mode == "off":
        return None
    # CPU devices talk through gloo; the setting does not touch GPU or TPU collectives
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
    except (ValueError, RuntimeError) as error:
        raise ToolFailed(
            f"could not start the multi-process runtime ({kind or 'nothing detected'}): {error}. "
            f"Give --coordinator_address HOST:PORT --num_processes N --process_id I, or "
            f"--multihost=off for one process") from None
    return kind or "jax"


def allgather_rows(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Concatenates each process's rows (process 0's first) on every process. Every process must
    pass the same keys, dtypes and shapes; text columns (bytes or str objects) are welcome."""
    import jax

    if jax.process_count() == 1:
        return {k: np.asarray(v) for k, v in arrays.items()}
    from jax.experimental import multihost_utils

    numeric, text = {}, {}
    for key, value in arrays.items():
        value = np.asarray(value)
        if value.dtype.kind in "OSU":
            text[key] = [v if isinstance(v, bytes) else str(v).encode() for v in value]
        elif value.dtype == bool:
            numeric[key] = value.astype(np.uint8)
        else:
            numeric[key] = value
    if text:
        longest = max((len(v) for column in text.values() for v in column), default=0)
        width = int(np.max(multihost_utils.process_allgather(np.int32(longest)))) or 1
        for key, column in text.items():
            codes = np.zeros((len(column), width), np.uint8)
            for row, value in enumerate(column):
                codes[row, :len(value)] = np.frombuffer(value, np.uint8)
            numeric[key] = codes
    gathered = multihost_utils.process_allgather(numeric, tiled=False)
    out = {}
    for key, value in arrays.items():
        rows = np.asarray(gathered[key])
        rows = rows.reshape(-1, *rows.shape[2:])
        if key in text:
            out[key] = np.array([bytes(r).rstrip(b"\0") for r in rows], dtype=object)
        elif np.asarray(value).dtype == bool:
            out[key] = rows.astype(bool)
        else:
            out[key] = rows
    return out


def replicate(tree: Any, mesh: Any) -> Any:
    """Host values that every process holds identically (parameters initialised from one seed)
    -> global arrays replicated over `mesh`. PRNG keys go as their raw data and are rewrapped."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    sharding = NamedSharding(mesh, PartitionSpec())
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(x)),
                                            impl=jax.random.key_impl(x))
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree.map(put, tree)


def to_global(batch: Mapping[str, np.ndarray], mesh: Any) -> dict[str, Any]:
    """Numeric entries of a process-local batch as global jax.Arrays sharded along their first
    axis over the mesh axis 'data'; other entries (patient ids) stay host-side numpy."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    sharding = NamedSharding(mesh, PartitionSpec("data"))
    return {key: jax.make_array_from_process_local_data(sharding, value)
            if np.asarray(value).dtype.kind in "biufc" else value
            for key, value in batch.items()}


def local_rows(array: Any) -> np.ndarray:
    """This process's rows of a global array sharded along axis 0, in order."""
    shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InvalidSetting(f"expected an integer in the environment, got {text!r}") from None
