"""Training throughput against input throughput, side by side, so a reader sees whether the input
pipeline ever limits training.

    python benchmarks/train.py --data_dir DATASET [--config configs/resnet.py:resnet18]
                               [--batch 32] [--steps 30] [--repeats 3]

Three measurements per repeat, each after a warm-up (compilation excluded):
  input      a fresh train_iterator with the config's augmentation alone (host tf.data),
             5x as many batches, after 2 warm-up batches (its prefetch buffer starts empty)
  step       the jitted train step on one device-resident batch (compute alone)
  end-to-end iterator -> to_global -> train step, as in training
Prints medians (images/s) and the end-to-end rate as a fraction of each of the other two.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torchvision  # noqa: E402,F401  (must precede TensorFlow in a process; see tests/conftest.py)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from her2jax import input_pipeline, steps, train  # noqa: E402
from her2jax.optim import create_optimizer  # noqa: E402


def load_config(spec: str):
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("experiment_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def rate(function, count: int, batch: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        out = function()
    jax.block_until_ready(out)
    return count * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--config", default="configs/resnet.py:resnet18")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = load_config(args.config)
    config.data_dir, config.batch_size = args.data_dir, args.batch
    size = input_pipeline.preparation_metadata(args.data_dir)["preparation"]["image_size"]
    mesh = steps.data_mesh()
    graph, _, params, rest = steps.split_model(train.build_model(config, size))
    optimizer = create_optimizer(params, learning_rate=1e-4, warmup_steps=0, total_steps=10**6)
    opt_state = optimizer.init(params)
    step = steps.make_train_step(graph, optimizer, mesh, dtype=jnp.dtype(config.dtype))
    def new_iterator():
        return input_pipeline.train_iterator(
            args.data_dir, global_batch_size=args.batch, seed=0,
            augment=config.input.augment.to_dict(), balance=config.input.balance)

    def input_rate() -> float:
        fresh = new_iterator()
        next(fresh), next(fresh)
        return rate(lambda: next(fresh)["image"], 5 * args.steps, args.batch)

    iterator = new_iterator()
    batch = input_pipeline.to_global(next(iterator), mesh)
    state = [params, rest, opt_state]

    def compute():
        state[:3] = step(*state[:3], batch)[:3]
        return state[0]

    def end_to_end():
        state[:3] = step(*state[:3], input_pipeline.to_global(next(iterator), mesh))[:3]
        return state[0]

    compute(), end_to_end()  # compile
    results = {"input": [], "step": [], "end-to-end": []}
    for _ in range(args.repeats):
        results["input"].append(input_rate())
        results["step"].append(rate(compute, args.steps, args.batch))
        results["end-to-end"].append(rate(end_to_end, args.steps, args.batch))
    device = jax.devices()[0]
    print(f"{config.model.name} {config.model.kwargs.to_dict()}, {size}x{size} images, batch "
          f"{args.batch}, {args.steps} steps x {args.repeats}, {device.platform} "
          f"({device.device_kind}), {os.cpu_count()} CPU cores")
    print("| measurement | median images/s | min-max |")
    print("|---|---|---|")
    for name, values in results.items():
        print(f"| {name} | {statistics.median(values):.1f} | {min(values):.1f}-{max(values):.1f} |")
    e2e = statistics.median(results["end-to-end"])
    print(f"end-to-end / input = {e2e / statistics.median(results['input']):.2f}, "
          f"end-to-end / step = {e2e / statistics.median(results['step']):.2f}")


if __name__ == "__main__":
    main()
