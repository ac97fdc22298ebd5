"""Forward against forward + backward, her2jax against PyTorch eager: where a ResNet's time goes.

    python benchmarks/passes.py [--models resnet18,resnet50] [--image_size 224] [--batch 8]

For each ResNet with dual attention on layer4 (the models of `torch_compare.py`, random weights),
in training mode: the loss alone (forward) and the gradient of the loss with respect to every
parameter (forward + backward), jitted in her2jax, eager in PyTorch (float32, no optimiser).
Milliseconds per batch: median of --repeats windows of 3 calls after 3 warm-up calls.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from cpu_ops import milliseconds  # noqa: E402


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json")
    return parser.parse_args(argv)


def her2jax_times(name: str, images: np.ndarray, labels: np.ndarray, repeats: int):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from her2jax import models

    model = models.create(name, num_classes=2, rngs=nnx.Rngs(0), attention="dual",
                          placement="last", head="single", dropout=0.5)
    model.train()
    graph, params, rest = nnx.split(model, nnx.Param, ...)
    x, y = jnp.asarray(images), jnp.asarray(labels)

    def loss(model):
        logits = model(x)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(labels)), y])

    forward = jax.jit(lambda p, r: loss(nnx.merge(graph, p, r)))
    backward = jax.jit(lambda p, r: nnx.grad(loss)(nnx.merge(graph, p, r)))
    return (milliseconds(lambda: jax.block_until_ready(forward(params, rest)), repeats, 3),
            milliseconds(lambda: jax.block_until_ready(backward(params, rest)), repeats, 3))


def torch_times(depth: int, images: np.ndarray, labels: np.ndarray, repeats: int):
    import torch

    import torch_models

    net = torch_models.resnet(depth).train()
    x = torch.tensor(images).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor(labels)

    def forward():
        with torch.no_grad():
            torch.nn.functional.cross_entropy(net(x), y)

    def backward():
        net.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()

    return milliseconds(forward, repeats, 3), milliseconds(backward, repeats, 3)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(argv)
    import torch

    from her2jax.models import layers

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    images = rng.random((args.batch, args.image_size, args.image_size, 3), np.float32)
    labels = np.arange(args.batch) % 2
    rows = []
    for name in args.models.split(","):
        if not name.startswith("resnet"):
            raise SystemExit(f"{name}: this benchmark takes resnet18/34/50/101")
        jax_ms = her2jax_times(name, images, labels, args.repeats)
        torch_ms = torch_times(int(name.removeprefix("resnet")), images, labels, args.repeats)
        rows.append({"model": f"{name}_dual", "her2jax_ms": jax_ms, "torch_ms": torch_ms})
    mode = os.environ.get(layers.ENVIRONMENT, "auto")
    print(f"{args.image_size}x{args.image_size}, batch {args.batch}, float32, training mode, "
          f"ms per batch (median of {args.repeats} windows of 3 calls); "
          f"{layers.ENVIRONMENT}={mode}, torch threads {args.threads}")
    print("| model | forward her2jax / torch | forward + backward her2jax / torch | "
          "backward alone her2jax / torch |")
    print("|---|---|---|---|")
    for row in rows:
        (jf, jb), (tf, tb) = row["her2jax_ms"], row["torch_ms"]
        print(f"| {row['model']} | {jf:.0f} / {tf:.0f} | {jb:.0f} / {tb:.0f} | "
              f"{jb - jf:.0f} / {tb - tf:.0f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"arguments": vars(args), "rewrites": mode, "rows": rows}, handle,
                      indent=2)
    return rows


if __name__ == "__main__":
    main()
