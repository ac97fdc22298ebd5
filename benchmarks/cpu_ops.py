"""The operations behind the CPU gap, one at a time: XLA's library form, her2jax's rewrite, torch.

    python benchmarks/cpu_ops.py [--batch 8] [--repeats 5] [--json out.json] [--dry_run]

For every 1x1 convolution shape of ResNet-50 at 224x224 and the stem's 3x3 / stride 2 max pool,
times the forward pass, forward + backward (gradients of sum(y * probe) with respect to the
input and, for convolutions, the kernel) and, for convolutions, the kernel gradient alone (what
training needs at the stem; torch: `torch.nn.grad.conv2d_weight`): `jax.lax.conv_general_dilated` / flax `max_pool`
(library), `her2jax.models.layers` (rewrite), and torch eager (NCHW, the threads it is given).
For reference it also times the 3x3 convolutions of ResNet-18's stages and the 7x7 stem, which
have no rewrite. Milliseconds: median of --repeats windows of 5 calls, after 3 warm-up calls.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

NHWC = ("NHWC", "HWIO", "NHWC")
# (batch-free input H = W, C_in, C_out, kernel, stride, padding)
POINTWISE = [(56, 64, 256, 1, 1, 0), (56, 256, 64, 1, 1, 0), (28, 512, 128, 1, 1, 0),
             (14, 1024, 256, 1, 1, 0), (7, 2048, 512, 1, 1, 0), (56, 256, 512, 1, 2, 0)]
SPATIAL = [(224, 3, 64, 7, 2, 3), (56, 64, 64, 3, 1, 1), (28, 128, 128, 3, 1, 1),
           (14, 256, 256, 3, 1, 1), (7, 512, 512, 3, 1, 1)]
POOL = (112, 64)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch intra-op threads (default: every core)")
    parser.add_argument("--json", help="write every number here")
    parser.add_argument("--dry_run", action="store_true",
                        help="two small shapes, batch 2, 1 repeat: for tests")
    return parser.parse_args(argv)


def milliseconds(call: Callable[[], object], repeats: int, per_window: int = 5) -> float:
    for _ in range(3):      # compilation, allocator and library set-up stay out of the timing
        call()
    windows = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(per_window):
            call()
        windows.append((time.perf_counter() - start) / per_window * 1e3)
    return statistics.median(windows)


def jax_times(forward: Callable, arrays: tuple, repeats: int) -> tuple[float, ...]:
    """(forward, forward + backward[, kernel gradient]) in ms of a jitted function of jax arrays;
    the third, for two or more arguments, is the gradient of the last one alone (the loss is
    linear in the output, so XLA drops the forward pass from it)."""
    import jax
    import jax.numpy as jnp

    # a random probe passed as an argument: XLA would simplify a constant output gradient
    shape = jax.eval_shape(forward, *arrays).shape
    probe = jnp.asarray(np.random.default_rng(1).normal(size=shape).astype(np.float32))

    def loss(*a):
        *a, weights = a
        return jnp.sum(forward(*a) * weights)

    run = jax.jit(forward)
    both = jax.jit(jax.grad(loss, argnums=tuple(range(len(arrays)))))
    times = [milliseconds(lambda: jax.block_until_ready(run(*arrays)), repeats),
             milliseconds(lambda: jax.block_until_ready(both(*arrays, probe)), repeats)]
    if len(arrays) > 1:
        last = jax.jit(jax.grad(loss, argnums=len(arrays) - 1))
        times.append(milliseconds(lambda: jax.block_until_ready(last(*arrays, probe)),
                                  repeats))
    return tuple(times)


def torch_times(forward: Callable, tensors: tuple, repeats: int,
                kernel_gradient: Callable | None = None) -> tuple[float, ...]:
    """As `jax_times`, torch eager; `kernel_gradient(probe)` computes the third figure."""
    import torch

    with torch.no_grad():
        shape = forward(*tensors).shape
    probe = torch.tensor(np.random.default_rng(1).normal(size=tuple(shape)).astype(np.float32))

    def infer():
        with torch.no_grad():
            forward(*tensors)

    def train(wrt):
        torch.autograd.grad((forward(*tensors) * probe).sum(), wrt)

    times = [milliseconds(infer, repeats), milliseconds(lambda: train(tensors), repeats)]
    if kernel_gradient is not None:
        times.append(milliseconds(lambda: kernel_gradient(probe), repeats))
    return tuple(times)


def measure(args) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from her2jax.models import layers

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    pointwise, spatial, pool = POINTWISE, SPATIAL, POOL
    if args.dry_run:
        pointwise, spatial, pool = [(8, 16, 32, 1, 2, 0)], [(16, 8, 8, 3, 1, 1)], (16, 8)
    rows = []
    for size, c_in, c_out, k, stride, pad in pointwise + spatial:
        x = rng.normal(size=(args.batch, size, size, c_in)).astype(np.float32)
        w = (rng.normal(size=(k, k, c_in, c_out)) * 0.05).astype(np.float32)
        padding = ((pad, pad), (pad, pad))
        arrays = (jnp.asarray(x), jnp.asarray(w))

        def library(x, w, stride=stride, padding=padding):
            return jax.lax.conv_general_dilated(x, w, (stride, stride), padding,
                                                dimension_numbers=NHWC)

        def rewrite(x, w, stride=stride, padding=padding):
            return layers.conv_general_dilated(x, w, (stride, stride), padding,
                                               dimension_numbers=NHWC)

        xt = torch.tensor(x).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
        wt = torch.tensor(w).permute(3, 2, 0, 1).contiguous().requires_grad_(True)
        row = {"op": f"{k}x{k} conv" + (f" /{stride}" if stride > 1 else ""),
               "shape": f"{size}x{size}x{c_in} -> {c_out}"}
        row["library_ms"] = jax_times(library, arrays, args.repeats)
        row["rewrite_ms"] = (jax_times(rewrite, arrays, args.repeats) if k == 1 else None)
        row["torch_ms"] = torch_times(
            lambda a, b, s=stride, p=pad: torch.nn.functional.conv2d(a, b, stride=s,
                                                                     padding=p),
            (xt, wt), args.repeats,
            kernel_gradient=lambda probe, s=stride, p=pad, x=xt.detach(), shape=wt.shape:
                torch.nn.grad.conv2d_weight(x, shape, probe, stride=s, padding=p))
        rows.append(row)
    size, channels = pool
    x = np.maximum(rng.normal(size=(args.batch, size, size, channels)), 0).astype(np.float32)
    arrays = (jnp.asarray(x),)
    rows.append({
        "op": "max pool 3x3 /2", "shape": f"{size}x{size}x{channels}",
        "library_ms": jax_times(lambda v: nnx.max_pool(v, (3, 3), strides=(2, 2),
                                                       padding=((1, 1), (1, 1))),
                                arrays, args.repeats),
        "rewrite_ms": jax_times(lambda v: layers.max_pool(v, 3, 2, 1), arrays, args.repeats),
        "torch_ms": torch_times(lambda v: torch.nn.functional.max_pool2d(v, 3, 2, 1),
                                (torch.tensor(x).permute(0, 3, 1, 2).contiguous()
                                 .requires_grad_(True),), args.repeats)})
    return rows


def table(rows: list[dict], args) -> str:
    def cell(times):
        return "-" if times is None else " / ".join(f"{t:.2f}" for t in times)

    lines = [f"batch {args.batch}, float32, ms: forward / forward + both gradients [/ kernel "
             f"gradient alone] (median of {args.repeats} windows of 5 calls), torch threads "
             f"{args.threads}",
             "| op | input -> output channels | XLA library form | her2jax rewrite | torch eager |"
             " rewrite / library (fwd+bwd) |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        ratio = ("-" if row["rewrite_ms"] is None
                 else f"{row['rewrite_ms'][1] / row['library_ms'][1]:.2f}")
        lines.append(f"| {row['op']} | {row['shape']} | {cell(row['library_ms'])} | "
                     f"{cell(row['rewrite_ms'])} | {cell(row['torch_ms'])} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(argv)
    if args.dry_run:
        args.batch, args.repeats = 2, 1
    import jax

    if jax.default_backend() != "cpu":
        print(f"note: JAX's default backend is {jax.default_backend()}; this benchmark is about "
              "the CPU", file=sys.stderr)
    from her2jax.models import layers

    previous = os.environ.get(layers.ENVIRONMENT)
    os.environ[layers.ENVIRONMENT] = "on"      # the rewrite column, whatever the backend
    try:
        rows = measure(args)
    finally:
        if previous is None:
            os.environ.pop(layers.ENVIRONMENT)
        else:
            os.environ[layers.ENVIRONMENT] = previous
    print(table(rows, args))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"arguments": vars(args), "rows": rows}, handle, indent=2)
    return rows


if __name__ == "__main__":
    main()
