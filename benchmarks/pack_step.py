"""Packed training steps against one run's, at the same per-member batch: the aggregate training
images/s of a pack of K members (one compiled step, `steps.make_train_step(members=True)`) and
of one run, batches drawn on the device from a resident split, as `input.source=device` trains.
No TensorFlow: the resident split is a synthetic uint8 array (random slices and labels) put on
the device directly, in place of the TFRecord read, so this runs on a machine without it.

    python benchmarks/pack_step.py [--config configs/resnet.py:resnet18] [--image_size 224]
        [--batch 64] [--packs 1,8] [--layouts auto|vmap|map[,...]] [--steps 20] [--repeats 3]
        [--dtype bfloat16] [--peak_tflops 989] [--val_rows 2048] [--eval_batch 256]
        [--json OUT.json] [--dry_run]

Per K, and per member layout for K > 1 (`steps.member_layout_of`: vmap, map, or auto, the
platform's default):
- compile seconds (tracing, lowering and compiling the step), also per member;
- the median step time over --repeats windows of --steps steps (each step draws its batches on
  the device), aggregate images/s and the ratio to the first K;
- with --peak_tflops, the model FLOP utilisation: K times one run's step FLOPs, counted by XLA
  for the CPU (its GPU count leaves out the cuDNN convolutions), over the step time and peak;
- one validation pass (--val_rows slices at --eval_batch, the compiled evaluation step, one
  member's parameters; a pack evaluates its members one after another);
- the share of a run's time in training steps, projected for a run of the config's
  total_steps with an evaluation every eval.every_steps and at the end: steps / (compiles +
  steps + K validation passes per evaluation). Process start and the data read are not in it
  (benchmarks/sweep.py measures them end to end on a CPU).
--dry_run: 16 px, batch 4, 2 steps, 32 validation slices (a check of the script on a CPU).
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


def measure(config, k: int, layout: str, args, mesh, host) -> dict:
    states, hypers = [], []
    for member in range(k):
        config.seed = member
        model = models.from_config(config, args.image_size)
        (rate,) = dropout_rates(model) or {0.0}
        graph, eval_graph, params, rest = steps.split_model(model)
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
        member_layout=layout,
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
    if args.peak_tflops:     # one member's step counted on the CPU (XLA's GPU count omits
        flops = k * member_flops(graph, factory, states[0], hypers[0],   # the cuDNN calls)
                                 streams[0].batch(1), args, config)

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
    evaluation = evaluation_pass(eval_graph, jax.tree.map(lambda x: x[0] if k > 1 else x, state),
                                 mesh, args)
    run_steps = int(config.total_steps)
    evaluations = len(range(int(config.eval.every_steps), run_steps + 1,
                            int(config.eval.every_steps))) + 1
    train_total = run_steps * step_seconds
    run_total = (compile_seconds + evaluation["compile_seconds"] + train_total
                 + evaluations * k * evaluation["pass_seconds"])
    row = {"members": k, "layout": steps.member_layout_of(layout) if k > 1 else "single",
           "batch_per_member": args.batch,
           "compile_seconds": round(compile_seconds, 2),
           "compile_seconds_per_member": round(compile_seconds / k, 2),
           "step_ms": round(1000 * step_seconds, 2),
           "images_per_second": round(k * args.batch / step_seconds, 1),
           "eval_compile_seconds": evaluation["compile_seconds"],
           "eval_pass_seconds": evaluation["pass_seconds"],
           "eval_images_per_second": evaluation["images_per_second"],
           "projected_run": {"steps": run_steps, "evaluations": evaluations,
                             "step_share": round(train_total / run_total, 3),
                             "seconds": round(run_total, 1)}}
    if flops:
        row["mfu"] = round(flops / step_seconds / (args.peak_tflops * 1e12), 4)
    return row


_FLOPS: dict = {}


def member_flops(graph, factory, state, hyper, batch, args, config) -> float:
    """XLA's FLOP count of one run's train step compiled for the CPU (shapes only), cached."""
    key = (args.image_size, args.batch)
    if key not in _FLOPS:
        cpu = jax.devices("cpu")[0]

        def abstract(tree):
            return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
        step = steps.make_train_step(graph, factory, steps.data_mesh([cpu]),
                                     dtype=jnp.dtype(args.dtype),
                                     augment=Augment.from_mapping(config.input.augment.to_dict()))
        compiled = step.lower(abstract(state["params"]), abstract(state["rest"]),
                              abstract(state["opt_state"]), abstract(batch),
                              abstract(hyper)).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        _FLOPS[key] = float((cost or {}).get("flops", 0.0))
    return _FLOPS[key]


def evaluation_pass(eval_graph, state, mesh, args) -> dict:
    """Compile the evaluation step, then time one pass over --val_rows synthetic slices."""
    rng = np.random.default_rng(1)
    rows = args.val_rows - args.val_rows % args.eval_batch or args.eval_batch
    images = jax.device_put(rng.integers(0, 256, (rows, args.image_size, args.image_size, 3),
                                         dtype=np.uint8), steps.batch_sharding(mesh))
    step = steps.make_eval_step(eval_graph, mesh, dtype=jnp.dtype(args.dtype))
    start = time.perf_counter()
    compiled = step.lower(state["params"], state["rest"],
                          {"image": images[:args.eval_batch]}).compile()
    compile_seconds = time.perf_counter() - start

    def one_pass():
        out = [compiled(state["params"], state["rest"], {"image": images[i:i + args.eval_batch]})
               for i in range(0, rows, args.eval_batch)]
        jax.block_until_ready(out)

    one_pass()                                      # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"compile_seconds": round(compile_seconds, 2), "pass_seconds": round(seconds, 3),
            "images_per_second": round(rows / seconds, 1)}


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
    parser.add_argument("--layouts", default="auto",
                        help="member layouts to measure each K > 1 in (steps.MEMBER_LAYOUTS)")
    parser.add_argument("--val_rows", type=int, default=2048, help="validation slices")
    parser.add_argument("--eval_batch", type=int, default=256)
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--dry_run", action="store_true", help="tiny shapes, for tests")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.image_size, args.batch, args.steps, args.repeats = 16, 4, 2, 1
        args.val_rows, args.eval_batch = 32, 8
    config = common.load(args.config)
    mesh = steps.data_mesh()
    host = synthetic_split(max(4 * args.batch, 64), args.image_size)
    print(f"{args.config} {args.image_size} px, batch {args.batch} per member, {args.dtype}, "
          f"{jax.devices()[0].device_kind} x{jax.device_count()}; synthetic uint8 split on the "
          f"device (no TFRecord read)", flush=True)
    rows = []
    layouts = args.layouts.split(",")
    for layout in layouts:
        steps.member_layout_of(layout)               # an unknown one refused before measuring
    for k in [int(k) for k in args.packs.split(",")]:
        for layout in layouts if k > 1 else layouts[:1]:
            rows.append(measure(config, k, layout, args, mesh, host))
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
