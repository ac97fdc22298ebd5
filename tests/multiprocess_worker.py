"""One process of the two-process training test (tests/test_multiprocess.py):
    python tests/multiprocess_worker.py PORT PROCESS_ID DATA_DIR WORKDIR OUT
trains two steps with its peer over gloo, then writes what it holds to OUT/process_<id>.npz and
OUT/process_<id>.json, and the keys of orbax's background barriers to OUT/barriers_<id>.json;
then draws batches of the device-resident source, replicated and sharded, and evaluates its
validation split with a model-free step, writing its rows of both to OUT/resident_<id>.npz."""
from __future__ import annotations

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.pop("XLA_FLAGS", None)          # one CPU device per process
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(port: str, process_id: str, data_dir: str, workdir: str, out: str) -> None:
    from her2jax import distributed

    kind = distributed.initialize("auto", coordinator_address=f"127.0.0.1:{port}",
                                  num_processes=2, process_id=int(process_id))
    import jax
    import numpy as np
    from flax import nnx

    from configs import resnet
    from her2jax.run_folder import RunFolder
    from her2jax.training import loop as train

    config = resnet.get_config("resnet18,runlocal")
    config.data_dir = data_dir
    config.batch_size = 4
    config.total_steps = 2
    config.warmup_steps = 1
    config.log_every_steps = 1
    config.eval.every_steps = 2
    config.eval.batch_size = 3      # 2 per process after rounding up to the device count
    config.checkpoint.every_steps = 2
    barriers = record_barriers()
    report = train.train_and_evaluate(config, workdir)
    with open(os.path.join(out, f"barriers_{process_id}.json"), "w") as handle:
        json.dump(barriers, handle)
    restored = RunFolder(workdir).restore("latest")
    leaves = jax.tree.leaves(nnx.state(restored.model, nnx.Param))
    np.savez(os.path.join(out, f"process_{process_id}.npz"),
             *[np.asarray(leaf.addressable_data(0)) for leaf in leaves])
    with open(os.path.join(out, f"process_{process_id}.json"), "w") as handle:
        json.dump({"kind": kind, "process_index": jax.process_index(),
                   "process_count": jax.process_count(), "devices": jax.device_count(),
                   "report": report, "step": restored.step}, handle, default=float)
    resident_rows(data_dir, os.path.join(out, f"resident_{process_id}.npz"))


def record_barriers() -> list[str]:
    """The keys of the coordination-service barriers that orbax's background threads enter, in
    the order this process entered them (the list fills as training runs)."""
    from orbax.checkpoint._src.multihost import multihost

    keys: list[str] = []
    original = multihost.get_barrier_sync_fn

    def recording(**kwargs):
        sync = original(**kwargs)

        def fn(*, key, timeout_ms):
            keys.append(key)
            return sync(key=key, timeout_ms=timeout_ms)
        return fn

    multihost.get_barrier_sync_fn = recording
    return keys


def resident_rows(data_dir: str, path: str) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from her2jax import distributed
    from her2jax.data import resident
    from her2jax.training import inference, steps

    mesh = steps.data_mesh()
    host = resident.read_split(data_dir, "train")
    arrays = {}
    for layout in ("replicated", "sharded"):
        stream = resident.train_stream(host, mesh, global_batch_size=4, seed=1, balance="none",
                                       layout=layout)
        arrays[layout] = np.stack([distributed.local_rows(stream.batch(i)["image"])
                                   for i in range(12)])
    sharded = NamedSharding(mesh, PartitionSpec("data"))
    step = jax.jit(lambda p, r, b: jnp.mean(b["image"].astype(jnp.float32), axis=(1, 2, 3)),
                   in_shardings=(None, None, sharded), out_shardings=sharded)
    predictor = inference.Predictor(step, None, None, mesh)
    on_device = resident.eval_split(resident.read_split(data_dir, "validation"), mesh, 2)
    for name, rows in (("device", on_device.probabilities(predictor)),
                       ("tfrecord", predictor.split(data_dir, "validation", batch_size=2))):
        arrays[f"eval_{name}"] = rows["probability"]
        arrays[f"eval_{name}_slices"] = rows["slice_index"]
    np.savez(path, **arrays)


if __name__ == "__main__":
    main(*sys.argv[1:])
