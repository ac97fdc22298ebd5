"""Packed training steps against one run's, at the same per-member batch: the aggregate training
images/s of a pack of K members (one vmapped step, `steps.make_train_step(members=True)`) and of
one run, batches drawn on the device from a resident split, as `input.source=device` trains.
No TensorFlow: the resident split is a synthetic uint8 array (random slices and labels) put on
the device directly, in place of the TFRecord read, so this runs on a machine without it.

    python benchmarks/pack_step.py [--config configs/resnet.py:resnet18] [--image_size 224]
        [--batch 64] [--packs 1,8] [--steps 20] [--repeats 3] [--dtype bfloat16]
        [--peak_tflops 989] [--json OUT.json] [--dry_run]

Per K: compile seconds (tracing, lowering and compiling the step) and per member, the
median step time over --repeats windows of --steps steps (each step draws its batches on the
device), aggregate images/s, the ratio to K=1 and, with --peak_tflops, the model FLOP
utilisation from the compiled step's cost analysis. --dry_run: 16 px, batch 4, 2 steps (a check
of the script on a CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import common  # noqa: E402
from her2jax import models  # noqa: E402
from her2jax.data import resident  # noqa: E402
from her2jax.data.augment_options import Augment  # noqa: E402
from her2jax.models.layers import dropout_rates  # noqa: E402
from her2jax.training import optim, steps  # noqa: E402


def synthetic_split(rows: int, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (rows, size, size, 3), dtype=np.uint8),
            "label": rng.integers(0, 2, rows).astype(np.int32),
            "patient_id": np.array([f"P{i // 8}" for i in range(rows)], dtype=object),
            "cohort": np.array(["synthetic"] * rows, dtype=object),
            "slice_index": np.arange(rows, dtype=np.int32)}


def measure(config, k: int, args, mesh, host) -> dict:
    states, hypers = [], []
    for member in range(k):
        config.seed = member
        model = models.from_config(config, args.image_size)
        (rate,) = dropout_rates(model) or {0.0}
        graph, _, params, rest = steps.split_model(model)
        hyper = {key: np.float32(value) for key, value in optim.hyperparameters(config).items()}
        hyper["learning_rate"] = np.float32(config.optimizer.learning_rate * (1 + member))
        hyper["dropout_keep"] = np.float32(1.0 - rate)
        states.append({"params": params, "rest": rest})
        hypers.append(hyper)
    factory = optim.factory(config, states[0]["params"])
    for state, hyper in zip(states, hypers):
        state["opt_state"] = factory(hyper).init(state["params"])
    stack = (lambda *xs: jnp.stack(xs)) if k > 1 else (lambda x: x)
    state = jax.tree.map(stack, *states)
    hyper = jax.tree.map(stack, *hypers)
    streams = [resident.train_stream(host, mesh, global_batch_size=args.batch, seed=member,
                                     balance="none", layout="replicated") for member in range(k)]
    step = steps.make_train_step(
        graph, factory, mesh, dtype=jnp.dtype(args.dtype), members=k > 1,
        augment=Augment.from_mapping(config.input.augment.to_dict()))
    position = [0]

    def batch():
        position[0] += 1
        batches = [stream.batch(position[0]) for stream in streams]
        return jax.tree.map(stack, *batches)

    start = time.perf_counter()
    compiled = step.lower(state["params"], state["rest"], state["opt_state"], batch(),
                          hyper).compile()
    compile_seconds = time.perf_counter() - start
    flops = None
    if args.peak_tflops:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        flops = float(cost.get("flops", 0.0)) or None

    def run(count):
        nonlocal state
        for _ in range(count):
            params, rest, opt_state, metrics = compiled(state["params"], state["rest"],
                                                        state["opt_state"], batch(), hyper)
            state = {"params": params, "rest": rest, "opt_state": opt_state}
        jax.block_until_ready(metrics)

    run(2)                                          # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run(args.steps)
        times.append((time.perf_counter() - start) / args.steps)
    step_seconds = statistics.median(times)
    row = {"members": k, "batch_per_member": args.batch,
           "compile_seconds": round(compile_seconds, 2),
           "compile_seconds_per_member": round(compile_seconds / k, 2),
           "step_ms": round(1000 * step_seconds, 2),
           "images_per_second": round(k * args.batch / step_seconds, 1)}
    if flops:
        row["mfu"] = round(flops / step_seconds / (args.peak_tflops * 1e12), 4)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/resnet.py:resnet18")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64, help="per member")
    parser.add_argument("--packs", default="1,8", help="pack sizes K, the first the baseline")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--peak_tflops", type=float, help="the device's dense peak, for MFU")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--dry_run", action="store_true", help="tiny shapes, for tests")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.image_size, args.batch, args.steps, args.repeats = 16, 4, 2, 1
    config = common.load(args.config)
    mesh = steps.data_mesh()
    host = synthetic_split(max(4 * args.batch, 64), args.image_size)
    print(f"{args.config} {args.image_size} px, batch {args.batch} per member, {args.dtype}, "
          f"{jax.devices()[0].device_kind} x{jax.device_count()}; synthetic uint8 split on the "
          f"device (no TFRecord read)", flush=True)
    rows = []
    for k in [int(k) for k in args.packs.split(",")]:
        rows.append(measure(config, k, args, mesh, host))
        rows[-1]["vs_first"] = round(rows[-1]["images_per_second"]
                                     / rows[0]["images_per_second"], 2)
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"config": args.config, "image_size": args.image_size,
                       "dtype": args.dtype, "device": jax.devices()[0].device_kind,
                       "rows": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
