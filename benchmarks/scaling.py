"""Data-parallel scaling of the her2jax train step: steps/second on 1 and on N devices with the
same global batch, and that both compute the same loss.

    python benchmarks/scaling.py [--devices 1,2] [--model resnet18] [--image_size 64]
                                 [--batch 16] [--steps 10] [--repeats 3] [--json OUT]

Each device count runs in its own process (on CPU, N devices are simulated with
`--xla_force_host_platform_device_count=N`, so they share the same cores: the CPU figure checks
the sharded program's shape and overhead, not a speed-up; on a machine with several GPUs the
devices are real). Synthetic in-memory batches; no TensorFlow. Prints steps/s (median of the
repeats, each of --steps steps after a warm-up), the ratio to one device, and the first step's
loss of each device count (equal up to float tolerance when the sharding is right).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(args: argparse.Namespace) -> dict:
    """Runs in the child process: one device count."""
    sys.path.insert(0, ROOT)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from her2jax import models
    from her2jax.training import steps
    from her2jax.training.optim import create_optimizer

    mesh = steps.data_mesh()
    model = models.create(args.model, num_classes=2, rngs=nnx.Rngs(0),
                          **({"attention": "dual"} if args.model.startswith("resnet") else
                             {"image_size": args.image_size}))
    train_graph, _, params, rest = steps.split_model(model)
    optimizer = create_optimizer(params, learning_rate=1e-3, warmup_steps=1, total_steps=1000,
                                 weight_decay=0.05, grad_clip_norm=1.0)
    opt_state = optimizer.init(params)
    step = steps.make_train_step(train_graph, optimizer, mesh)
    rng = np.random.default_rng(0)
    sharding = steps.batch_sharding(mesh)
    batch = {"image": jax.device_put(rng.integers(0, 256, (args.batch, args.image_size,
                                                           args.image_size, 3), np.uint8),
                                     sharding),
             "label": jax.device_put(rng.integers(0, 2, args.batch).astype(np.int32), sharding)}
    state = jax.device_put((params, rest, opt_state),
                           jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    start = time.perf_counter()
    params, rest, opt_state, metrics = step(*state, batch)
    first_loss = float(metrics["loss"])
    compile_seconds = time.perf_counter() - start
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.steps):
            params, rest, opt_state, metrics = step(params, rest, opt_state, batch)
        jax.block_until_ready(metrics)
        rates.append(args.steps / (time.perf_counter() - start))
    return {"devices": jax.device_count(), "platform": jax.devices()[0].platform,
            "steps_per_second": statistics.median(rates), "min": min(rates), "max": max(rates),
            "first_step_seconds": compile_seconds, "first_loss": first_loss,
            "jax": jax.__version__}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default="1,2")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args)))
        return 0
    results = []
    for count in [int(c) for c in args.devices.split(",")]:
        env = dict(os.environ)
        if env.get("JAX_PLATFORMS", "cpu") == "cpu" or "CUDA_VISIBLE_DEVICES" not in env:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                                f" --xla_force_host_platform_device_count={count}").strip()
        command = [sys.executable, os.path.abspath(__file__), "--child", "--model", args.model,
                   "--image_size", str(args.image_size), "--batch", str(args.batch),
                   "--steps", str(args.steps), "--repeats", str(args.repeats)]
        if env.get("JAX_PLATFORMS", "") != "cpu" and count > 1 and "CUDA_VISIBLE_DEVICES" in env:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(env["CUDA_VISIBLE_DEVICES"].split(",")[:count])
        done = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
        if done.returncode:
            print(f"error: {count} device(s) failed:\n{done.stderr[-2000:]}", file=sys.stderr)
            return 1
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = results[0]["steps_per_second"]
    print(f"{args.model}, image {args.image_size}, global batch {args.batch}, "
          f"{results[0]['platform']}, jax {results[0]['jax']}, median of {args.repeats} x "
          f"{args.steps} steps")
    print("| devices | steps/s | min-max | vs first | first step s | first loss |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['devices']} | {r['steps_per_second']:.2f} | {r['min']:.2f}-{r['max']:.2f} | "
              f"{r['steps_per_second'] / base:.2f}x | {r['first_step_seconds']:.1f} | "
              f"{r['first_loss']:.6f} |")
    if args.json:
        with open(args.json, "w") as handle:     # a local results file
            json.dump({"arguments": vars(args), "results": results}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
