"""Training throughput against input throughput, side by side, so a reader sees whether the input
pipeline ever limits training.

    python benchmarks/train.py --data_dir DATASET [--config configs/resnet.py:resnet18]
                               [--batch 32] [--steps 30] [--repeats 3]
                               [--input_only] [--no_augment] [--augment_on host|device]
                               [--source tfrecord|device]

Three measurements per repeat, each after a warm-up (compilation excluded):
  input      a fresh train_iterator with the config's augmentation alone (host tf.data),
             5x as many batches, after 2 warm-up batches (its prefetch buffer starts empty)
  step       the jitted train step on one device-resident batch (compute alone)
  end-to-end iterator -> to_global -> train step, as in training
Prints medians (images/s) and the end-to-end rate as a fraction of each of the other two.
--input_only measures the input alone (no model is built: e.g. under `taskset` to see how the
host pipeline scales with cores); --no_augment reads without the augmentation (decoding and
batching alone); --augment_on device moves the augmentation from the input into the step (the
config's input.augment_on); --source device reads the train split once onto the device and draws
each batch there (input.source=device, augmentation in the step): "input" is then the draw alone.
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

from her2jax import models  # noqa: E402
from her2jax.data import pipeline as input_pipeline  # noqa: E402
from her2jax.data import resident  # noqa: E402
from her2jax.data.augment_options import AUGMENT_ON, Augment  # noqa: E402
from her2jax.training import steps  # noqa: E402
from her2jax.training.optim import create_optimizer  # noqa: E402


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


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--config", default="configs/resnet.py:resnet18")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--input_only", action="store_true", help="measure the input alone")
    parser.add_argument("--no_augment", action="store_true", help="input without augmentation")
    parser.add_argument("--augment_on", default=None, choices=AUGMENT_ON,
                        help="where the augmentation runs (default: the config's)")
    parser.add_argument("--source", default="tfrecord", choices=resident.SOURCES,
                        help="where the batches come from (device: augmentation on the device)")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    config.data_dir, config.batch_size = args.data_dir, args.batch
    if args.augment_on:
        config.input.augment_on = args.augment_on
    if args.source == "device":
        config.input.augment_on = "device"
    size = input_pipeline.preparation_metadata(args.data_dir)["preparation"]["image_size"]
    augment = None if args.no_augment else config.input.augment.to_dict()

    mesh = steps.data_mesh()
    if args.source == "device":
        layout = resident.choose_layout(resident.split_bytes(args.data_dir, "train"), 0,
                                        mesh.size, resident.free_bytes(jax.local_devices()[0]))
        stream = resident.train_stream(resident.read_split(args.data_dir, "train"), mesh,
                                       global_batch_size=args.batch, seed=0,
                                       balance=config.input.balance, layout=layout)

    def new_iterator():
        if args.source == "device":       # batch after batch drawn on the device
            return (stream.batch(index) for index in range(10**9))
        return input_pipeline.train_iterator(
            args.data_dir, global_batch_size=args.batch, seed=0, augment=augment,
            balance=config.input.balance, augment_on=config.input.augment_on)

    def to_device(batch):
        return batch if args.source == "device" else input_pipeline.to_global(batch, mesh)

    def input_rate() -> float:
        fresh = new_iterator()
        next(fresh), next(fresh)
        return rate(lambda: next(fresh)["image"], 5 * args.steps, args.batch)

    title = (f"{size}x{size} images, batch {args.batch}, {args.source} source, augmentation "
             f"{'off' if augment is None else 'on the ' + config.input.augment_on}, "
             f"{os.cpu_count()} CPU cores "
             f"({len(os.sched_getaffinity(0))} usable)")
    if args.input_only:
        results = {"input": [input_rate() for _ in range(args.repeats)]}
        print(f"input alone, {title}")
        return report(results)
    graph, _, params, rest = steps.split_model(models.from_config(config, size))
    optimizer = create_optimizer(params, learning_rate=1e-4, warmup_steps=0, total_steps=10**6)
    opt_state = optimizer.init(params)
    on_device = augment is not None and config.input.augment_on == "device"
    step = steps.make_train_step(graph, optimizer, mesh, dtype=jnp.dtype(config.dtype),
                                 augment=Augment.from_mapping(augment) if on_device else None)

    iterator = new_iterator()
    batch = to_device(next(iterator))
    state = [params, rest, opt_state]

    def compute():
        state[:3] = step(*state[:3], batch)[:3]
        return state[0]

    def end_to_end():
        state[:3] = step(*state[:3], to_device(next(iterator)))[:3]
        return state[0]

    compute(), end_to_end()  # compile
    results = {"input": [], "step": [], "end-to-end": []}
    for _ in range(args.repeats):
        results["input"].append(input_rate())
        results["step"].append(rate(compute, args.steps, args.batch))
        results["end-to-end"].append(rate(end_to_end, args.steps, args.batch))
    device = jax.devices()[0]
    print(f"{config.model.name} {config.model.kwargs.to_dict()}, {title}, {args.steps} steps x "
          f"{args.repeats}, {device.platform} ({device.device_kind})")
    report(results)
    e2e = statistics.median(results["end-to-end"])
    print(f"end-to-end / input = {e2e / statistics.median(results['input']):.2f}, "
          f"end-to-end / step = {e2e / statistics.median(results['step']):.2f}")
    return results


def report(results: dict[str, list[float]]) -> dict[str, list[float]]:
    print("| measurement | median images/s | min-max |")
    print("|---|---|---|")
    for name, values in results.items():
        print(f"| {name} | {statistics.median(values):.1f} | {min(values):.1f}-{max(values):.1f} |")
    return results


if __name__ == "__main__":
    main()
