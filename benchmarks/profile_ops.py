"""Where a ResNet's gradient spends its time on this machine, per XLA operation.

    python benchmarks/profile_ops.py [--model resnet18] [--image_size 224] [--batch 8] [--top 15]

Traces --steps calls of the jitted gradient of the loss (training mode, dual attention on
layer4, float32) with `jax.profiler.trace` (a Perfetto trace), sums each XLA operation's
duration and prints ms per step by group, then the largest operations with their HLO output
shape. Groups: convolutions (XLA:CPU's `ynn_fusion`s) split into forward, input gradient (op
name from the transpose of the forward) and kernel gradient (output not batch-leading: a kernel
shape such as [C_in, kh, kw, C_out]); `transpose*` fusions; everything else. Operations running
side by side make the sum exceed the step's wall time.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=15)
    return parser.parse_args(argv)


def group(name: str, line: str, batch: int) -> str:
    if name.startswith("ynn_fusion"):
        shape = re.match(r"\w+\[(\d+)", line)
        if shape and int(shape.group(1)) != batch:
            return "convolution kernel gradients"
        return ("convolution input gradients" if "transpose(" in line
                else "convolution forward")
    if name.startswith("transpose"):
        return "transposes"
    return "other operations"


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from her2jax import models

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((args.batch, args.image_size, args.image_size, 3), np.float32))
    y = jnp.asarray(np.arange(args.batch) % 2)
    model = models.create(args.model, num_classes=2, rngs=nnx.Rngs(0), attention="dual",
                          placement="last", head="single", dropout=0.5)
    model.train()
    graph, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(model):
        return -jnp.mean(jax.nn.log_softmax(model(x))[jnp.arange(args.batch), y])

    gradient = jax.jit(lambda p, r: nnx.grad(loss)(nnx.merge(graph, p, r)))
    hlo = gradient.lower(params, rest).compile().as_text()
    for _ in range(3):
        jax.block_until_ready(gradient(params, rest))
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            for _ in range(args.steps):
                jax.block_until_ready(gradient(params, rest))
        (path,) = glob.glob(f"{folder}/**/*.trace.json.gz", recursive=True)
        with gzip.open(path) as handle:
            trace = json.load(handle)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    definitions = {m.group(1): m.group(2) for m in
                   re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$", hlo, re.M)}
    per_op: collections.Counter = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and event["name"] in definitions:
            per_op[event["name"]] += event.get("dur", 0) / 1e3 / args.steps   # us -> ms/step
    groups: collections.Counter = collections.Counter()
    for name, ms in per_op.items():
        groups[group(name, definitions[name], args.batch)] += ms
    print(f"{args.model} with dual attention, gradient of the loss, {args.image_size}x"
          f"{args.image_size}, batch {args.batch}, float32: ms per step, {args.steps} steps")
    print("| group | ms per step |\n|---|---|")
    for name, ms in groups.most_common():
        print(f"| {name} | {ms:.1f} |")
    print(f"| all operations | {sum(groups.values()):.1f} |\n")
    print("| operation | ms per step | output |\n|---|---|---|")
    for name, ms in per_op.most_common(args.top):
        print(f"| {name} | {ms:.1f} | {definitions[name].split(' ')[0]} |")
    return dict(groups)


if __name__ == "__main__":
    main()
