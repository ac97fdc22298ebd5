"""`python -m her2jax.models`: every registered model with parameters, FLOPs and CPU forward time.

FLOPs are XLA's count (from a CPU compilation) for one forward pass of one image in eval mode (a
multiply-add counts as 2);
forward time is the median wall time of a jitted eval forward pass over `--batch` images on this
machine's default JAX device, after one warm-up call.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from her2jax import models
from her2jax.errors import InvalidSetting


def count_parameters(model: nnx.Module) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def forward_function(model: nnx.Module):
    """A jitted pure function (state, images) -> logits of the model in eval mode."""
    model.eval()
    graph, state = nnx.split(model)

    @jax.jit
    def forward(state, images):
        return nnx.merge(graph, state)(images)

    return forward, state


def flops_per_image(forward, state, image_size: int) -> float:
    """XLA's FLOP count, always from a CPU compilation: on GPU, convolutions become library calls
    that XLA's cost analysis does not count."""
    on_cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_cpu),
                            state)
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32, sharding=on_cpu)
    cost = forward.lower(abstract, images).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def forward_seconds(forward, state, image_size: int, batch: int, repeats: int) -> float:
    images = jnp.zeros((batch, image_size, image_size, 3), jnp.float32)
    forward(state, images).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward(state, images).block_until_ready()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def table(names: list[str], image_size: int, batch: int, repeats: int, out=sys.stdout,
          dtype: str = "float32") -> None:
    device = jax.devices()[0]
    print(f"image {image_size}x{image_size}, batch {batch}, compute {dtype}, median of {repeats}, "
          f"device {device.platform} ({device.device_kind}), jax {jax.__version__}", file=out)
    print("| model | parameters | GFLOPs / image | forward ms / batch | images/s |", file=out)
    print("|---|---|---|---|---|", file=out)
    for name in names:
        kwargs = {"image_size": image_size} if name.startswith(("vit", "swin")) else {}
        try:
            model = models.create(name, num_classes=2, rngs=nnx.Rngs(0), dtype=jnp.dtype(dtype),
                                  **kwargs)
        except InvalidSetting as error:  # e.g. an image smaller than the ViT's patch
            print(f"| {name} | not at {image_size} px: {error} | | | |", file=out, flush=True)
            continue
        forward, state = forward_function(model)
        flops = flops_per_image(forward, state, image_size)
        seconds = forward_seconds(forward, state, image_size, batch, repeats)
        print(f"| {name} | {count_parameters(model):,} | {flops / 1e9:.2f} | "
              f"{seconds * 1e3:.1f} | {batch / seconds:.1f} |", file=out, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m her2jax.models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--names", nargs="*", default=None, help="subset of models (default all)")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="compute dtype (parameters stay float32)")
    args = parser.parse_args(argv)
    for option in ("image_size", "batch", "repeats"):
        if getattr(args, option) < 1:
            parser.error(f"--{option} must be at least 1, got {getattr(args, option)}")
    unknown = sorted(set(args.names or []) - set(models.names()))
    if unknown:
        parser.error(f"unknown models {unknown}; registered: {', '.join(models.names())}")
    table(args.names or models.names(), args.image_size, args.batch, args.repeats,
          dtype=args.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
