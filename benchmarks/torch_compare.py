"""Training-step throughput of her2jax against the same models in PyTorch, in one process.

    python benchmarks/torch_compare.py [--models resnet18_dual,resnet50_dual,vit_small16,vit_base16]
        [--image_size 224] [--batch 8] [--steps 5] [--warmup 2] [--repeats 3]
        [--dtype float32|bfloat16] [--device cpu|gpu] [--compile [--compile_backend inductor]]
        [--vit_attention auto|xla|cudnn] [--cudnn_token_multiple N] [--her2jax_only] [--no_flops]
        [--her2jax_augment] [--json OUT] [--dry_run]

Models (see benchmarks/torch_models.py for the PyTorch side):
  resnet18_dual, resnet50_dual  her2jax resnet18/50(attention='dual', placement='last',
                                dropout=0.5) | torchvision ResNet + the same SE-then-CBAM-spatial
                                attention on layer4 + dropout 0.5 + linear
  vit_small16, vit_base16       her2jax vit_small/base_patch16 | timm vit_small/base_patch16_224
Both start from the same weights (the torch model's, converted), 2 classes.

One training step, both frameworks: a uint8 (N, H, W, 3) batch normalised on the device with the
ImageNet statistics, forward in training mode (dropout, BatchNorm batch statistics), float32
cross-entropy, backward, gradient clipping at global norm 1, AdamW (lr 1e-4, betas 0.9/0.999,
eps 1e-8, weight decay 0.05 on parameters of rank >= 2 except pos_embed/cls_token, none on the
rest) - her2jax's `create_optimizer` defaults. her2jax: `steps.make_train_step`, jitted.
PyTorch: eager (torch.optim.AdamW, clip_grad_norm_); --dtype bfloat16 runs it under autocast
(bfloat16) and her2jax with compute dtype bfloat16 (float32 parameters in both). On GPU the
ResNets run channels_last; --compile adds a `torch.compile`d copy of the model (backend
--compile_backend, default inductor; aot_eager checks the path in seconds on a CPU).
--vit_attention sets the her2jax ViTs' attention_kernel: 'auto' (default, the model's default:
'cudnn' on an NVIDIA GPU in bfloat16, 'xla' elsewhere), 'xla' (written out) or 'cudnn' (fused
attention, as timm's scaled_dot_product_attention in PyTorch); FLOPs are counted on the same
model with attention written out; --cudnn_token_multiple sets the multiple its
token count is padded to (vit.CUDNN_TOKEN_MULTIPLE). --her2jax_only skips the PyTorch timings
(the PyTorch model still provides the weights) and --no_flops the CPU FLOP count: quick runs of
her2jax variants (benchmarks/jax_variants.py). XLA_FLAGS, when set, is recorded.
--her2jax_augment adds the default augmentation to her2jax's step, on the device
(`input.augment_on='device'`, one seed pair per image): what moving it off the host costs the
step (PyTorch is not augmented: use it with --her2jax_only).

Measured per model and framework, the same batch in the same process:
  images/s     median (and min-max) of --repeats windows of --steps steps, after --warmup
               steps; each window ends blocking on the results (block_until_ready /
               torch.cuda.synchronize)
  compile      her2jax: lower + XLA compile of the train step; torch.compile: the first step's
               wall time (compilation included)
  memory       CPU: growth of the process's resident set (sampled every 5 ms from
               /proc/self/statm) over the framework's whole phase (building the model and
               optimiser, compiling, every step), from the resident set at the phase's start;
               freed memory is handed back with malloc_trim between phases. GPU: JAX
               memory_stats()['peak_bytes_in_use'] (a process high-water mark: models run in the
               order given) and torch.cuda.max_memory_allocated (reset per model)
  FLOPs        XLA's count for one train step (batch included) from a CPU compilation (on GPU,
               XLA's cost analysis does not count the library convolutions); on GPU, MFU =
               FLOPs/step x steps/s / peak, with the peak printed

--json OUT is rewritten after every framework of every model ("complete": false until the last),
so a run stopped by a time limit keeps what it finished (a model's row shows "not run" for the
frameworks it did not reach). A framework that raises (out of memory, a
torch.compile error) is recorded as "failed" with its error in the table and the JSON, the other
runs go on, and the script exits with status 1 at the end.

--dry_run: image 32, batch 2, 1 warm-up step, 1 step, 1 repeat, ViTs of depth 2, ResNet-18 and
ViT-S by default: the whole script in well under a minute on a CPU.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from typing import Any, Callable

MODELS = {
    "resnet18_dual": {"family": "resnet", "depth": 18, "jax": "resnet18",
                      "torch": "torchvision resnet18 + dual attention"},
    "resnet50_dual": {"family": "resnet", "depth": 50, "jax": "resnet50",
                      "torch": "torchvision resnet50 + dual attention"},
    "vit_small16": {"family": "vit", "size": "small", "jax": "vit_small_patch16",
                    "torch": "timm vit_small_patch16_224"},
    "vit_base16": {"family": "vit", "size": "base", "jax": "vit_base_patch16",
                   "torch": "timm vit_base_patch16_224"},
}
DRY = {"image_size": 32, "batch": 2, "warmup": 1, "steps": 1, "repeats": 1, "vit_depth": 2,
       "models": "resnet18_dual,vit_small16"}
# Dense peak FLOP/s per device kind, for MFU: (substring of the device name, dtype) -> FLOP/s.
PEAKS = {("H100", "bfloat16"): 989e12, ("H100", "float32"): 67e12,
         ("H200", "bfloat16"): 989e12, ("H200", "float32"): 67e12}
PEAK_NOTE = ("H100/H200 SXM dense peaks: bfloat16 989 TFLOP/s (tensor cores), float32 "
             "67 TFLOP/s (non-tensor)")
# her2jax create_optimizer defaults
LEARNING_RATE, WEIGHT_DECAY, BETAS, EPS, CLIP = 1e-4, 0.05, (0.9, 0.999), 1e-8, 1.0
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None,
                        help=f"comma-separated subset of {', '.join(MODELS)} "
                             "(default: all; dry run: resnet18_dual,vit_small16)")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed window")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed windows")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--compile_backend", default="inductor",
                        help="torch.compile backend (inductor; eager or aot_eager only to test "
                             "the script)")
    parser.add_argument("--vit_attention", default="auto", choices=["auto", "xla", "cudnn"],
                        help="her2jax ViT attention_kernel (auto, the default: cudnn on NVIDIA "
                             "GPUs in bfloat16, xla elsewhere)")
    parser.add_argument("--cudnn_token_multiple", type=int, default=None,
                        help="pad the tokens to a multiple of this for cuDNN attention")
    parser.add_argument("--her2jax_only", action="store_true", help="skip the PyTorch timings")
    parser.add_argument("--no_flops", action="store_true", help="skip the CPU FLOP count")
    parser.add_argument("--her2jax_augment", action="store_true",
                        help="her2jax's step augments each image on the device")
    parser.add_argument("--json", default=None, help="write every number here")
    parser.add_argument("--dry_run", action="store_true", help="tiny shapes, for tests")
    args = parser.parse_args(argv)
    args.vit_depth = None
    if args.dry_run:
        for key, value in DRY.items():
            if key != "models":
                setattr(args, key, value)
        args.models = args.models or DRY["models"]
    names = (args.models or ",".join(MODELS)).split(",")
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
    args.models = names
    if args.cudnn_token_multiple is not None and args.cudnn_token_multiple < 1:
        parser.error("--cudnn_token_multiple must be positive")
    if args.her2jax_augment and not args.her2jax_only:
        parser.error("--her2jax_augment augments her2jax alone: add --her2jax_only")
    if args.her2jax_only and args.compile:
        parser.error("--her2jax_only times no PyTorch: leave out --compile")
    if min(args.steps, args.repeats, args.batch) < 1 or args.warmup < 0:
        parser.error("--steps, --repeats and --batch must be positive, --warmup non-negative")
    return args


def setup_environment(device: str) -> None:
    """Before JAX is imported: pick its platform; on GPU leave half the memory to PyTorch."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "jax" not in sys.modules:
        os.environ.setdefault("JAX_PLATFORMS", "cpu" if device == "cpu" else "cuda,cpu")
        if device == "gpu":
            os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")


# ---------------------------------------------------------------- memory


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RssPeak:
    """Peak resident set, sampled every 5 ms by a thread, above the resident set at start."""

    def __enter__(self) -> "RssPeak":
        _trim()
        self.start = _rss_bytes()
        self.peak = self.start or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        if self.start is not None:
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_bytes() or 0)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.start is not None:
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes() or 0)

    @property
    def growth(self) -> int | None:
        return None if self.start is None else self.peak - self.start


# ---------------------------------------------------------------- timing


def timed_windows(step: Callable[[], Any], sync: Callable[[Any], None], args) -> list[float]:
    """images/s of each of --repeats windows of --steps calls to `step`, after --warmup calls."""
    out = None
    for _ in range(args.warmup):
        out = step()
    sync(out)
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.steps):
            out = step()
        sync(out)
        rates.append(args.steps * args.batch / (time.perf_counter() - start))
    return rates


def summary(rates: list[float]) -> dict[str, Any]:
    return {"images_per_s": statistics.median(rates), "min": min(rates), "max": max(rates),
            "windows": rates}


# ---------------------------------------------------------------- PyTorch


def torch_model(spec: dict, args) -> Any:
    import torch_models

    if spec["family"] == "resnet":
        return torch_models.resnet(spec["depth"], num_classes=2, dropout=0.5)
    return torch_models.vit(spec["size"], args.image_size, num_classes=2, depth=args.vit_depth)


def torch_optimizer(net) -> Any:
    """AdamW with her2jax's decay mask: rank >= 2 and not pos_embed / cls_token."""
    import torch

    decay, rest = [], []
    for name, parameter in net.named_parameters():
        leaf = name.split(".")[-1]
        (decay if parameter.ndim >= 2 and leaf not in ("pos_embed", "cls_token") else rest).append(
            parameter)
    return torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                              {"params": rest, "weight_decay": 0.0}],
                             lr=LEARNING_RATE, betas=BETAS, eps=EPS)


def torch_run(net, spec: dict, images, labels, args, compiled: bool) -> dict[str, Any]:
    """Trains `net` (a fresh copy per run) on the one batch; throughput, first step, memory."""
    import torch
    import torch.nn.functional as F

    device = torch.device("cuda" if args.device == "gpu" else "cpu")
    channels_last = args.device == "gpu" and spec["family"] == "resnet"
    net = net.to(device).train()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    optimizer = torch_optimizer(net)
    model = torch.compile(net, backend=args.compile_backend) if compiled else net
    parameters = [p for p in net.parameters()]
    x = torch.from_numpy(images).to(device)
    y = torch.from_numpy(labels).long().to(device)
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    autocast = args.dtype == "bfloat16"

    def step():
        inputs = (x.permute(0, 3, 1, 2).float() / 255.0 - mean) / std
        inputs = inputs.contiguous(memory_format=torch.channels_last if channels_last
                                   else torch.contiguous_format)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(inputs)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, CLIP)
        optimizer.step()
        return loss

    def sync(_):
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    first_loss = float(step().detach())   # blocks
    first = time.perf_counter() - start
    rates = timed_windows(step, sync, args)
    result = summary(rates) | {"first_step_s": first, "first_loss": first_loss}
    if compiled:
        result["compile_s"] = first
    if device.type == "cuda":
        result["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated())
    return result


# ---------------------------------------------------------------- her2jax


def jax_setup(spec: dict, args, arrays: dict, dtype, attention_kernel: str | None = None):
    """The her2jax model with the torch model's weights, its optimiser and jitted train step."""
    from flax import nnx

    from her2jax import models
    from her2jax.training import steps
    from her2jax.training.optim import create_optimizer
    from her2jax.models.weights import load_pretrained

    if spec["family"] == "resnet":
        options = {"attention": "dual", "placement": "last", "head": "single", "dropout": 0.5}
    else:
        options = {"image_size": args.image_size}
        if args.vit_depth is not None:
            options["depth"] = args.vit_depth
        options["attention_kernel"] = attention_kernel or args.vit_attention
        if args.cudnn_token_multiple is not None:
            from her2jax.models import vit
            vit.CUDNN_TOKEN_MULTIPLE = args.cudnn_token_multiple
    model = models.create(spec["jax"], num_classes=2, rngs=nnx.Rngs(0), dtype=dtype, **options)
    report = load_pretrained(model, arrays)
    if report.missing or report.unused or report.mismatched:
        raise RuntimeError(f"{spec['jax']}: weights do not map one to one: missing "
                           f"{report.missing}, unused {report.unused}, mismatched "
                           f"{report.mismatched}")
    graph, _, params, rest = steps.split_model(model)
    optimizer = create_optimizer(params, learning_rate=LEARNING_RATE, warmup_steps=0,
                                 total_steps=10**9, weight_decay=WEIGHT_DECAY,
                                 grad_clip_norm=CLIP, b1=BETAS[0], b2=BETAS[1])
    return graph, params, rest, optimizer


def step_flops(graph, params, rest, optimizer, batch, dtype) -> float:
    """XLA's FLOP count of one train step, compiled for the CPU (as `python -m her2jax.models`)."""
    import jax

    from her2jax.training import steps

    cpu = jax.devices("cpu")[0]

    def abstract(tree):   # shapes only: the step's in_shardings place them on the CPU mesh
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)

    opt_state = jax.eval_shape(optimizer.init, params)
    step = steps.make_train_step(graph, optimizer, steps.data_mesh([cpu]), dtype=dtype)
    compiled = step.lower(abstract(params), abstract(rest), abstract(opt_state),
                          abstract(batch)).compile()
    return _flops(compiled)


def counting_graph(spec: dict, args, arrays: dict, dtype, graph):
    """The model graph to count FLOPs with on the CPU: with attention_kernel='cudnn' the same ViT
    with attention written out (a cuDNN call cannot be compiled for the CPU)."""
    if spec["family"] != "vit" or args.vit_attention == "xla":
        return graph
    return jax_setup(spec, args, arrays, dtype, attention_kernel="xla")[0]


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", float("nan")))


def jax_run(spec: dict, args, arrays: dict, images, labels) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from her2jax.training import steps

    dtype = jnp.dtype(args.dtype)
    graph, params, rest, optimizer = jax_setup(spec, args, arrays, dtype)
    mesh = steps.data_mesh()
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params, rest = jax.device_put((params, rest), replicated)
    opt_state = jax.device_put(optimizer.init(params), replicated)
    batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
    augment = None
    if args.her2jax_augment:
        from her2jax.data.augment_options import DEFAULT_AUGMENT, Augment

        augment = Augment.from_mapping(DEFAULT_AUGMENT)
        batch["augment_seed"] = jnp.stack([jnp.full((args.batch,), 7, jnp.uint32),
                                           jnp.arange(args.batch, dtype=jnp.uint32)], 1)
    batch = jax.device_put(batch, steps.batch_sharding(mesh))
    step = steps.make_train_step(graph, optimizer, mesh, dtype=dtype, augment=augment)
    start = time.perf_counter()
    lowered = step.lower(params, rest, opt_state, batch)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    on_cpu = jax.devices()[0].platform == "cpu"
    if args.no_flops:
        flops = None
    elif on_cpu:
        flops = _flops(compiled)
    else:
        flops = step_flops(counting_graph(spec, args, arrays, dtype, graph), params, rest,
                           optimizer, batch, dtype)
    state = [params, rest, opt_state]

    def one_step():
        state[0], state[1], state[2], metrics = compiled(*state, batch)
        return state[0], metrics["loss"]

    start = time.perf_counter()
    _, first_loss = one_step()
    first_loss = float(first_loss)   # blocks
    first = time.perf_counter() - start
    rates = timed_windows(one_step, jax.block_until_ready, args)
    result = summary(rates) | {"lower_s": lower_s, "compile_s": lower_s + compile_s,
                               "xla_compile_s": compile_s, "first_step_s": first,
                               "first_loss": first_loss, "flops_per_step": flops,
                               "parameters": sum(int(x.size) for x in jax.tree.leaves(params))}
    if not on_cpu:
        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            result["peak_memory_bytes"] = int(stats["peak_bytes_in_use"])
    return result


# ---------------------------------------------------------------- driver


def run_model(name: str, args, on_update: Callable[[dict], None] | None = None
              ) -> dict[str, Any]:
    """her2jax, PyTorch eager and (with --compile) torch.compile on one model; `on_update` gets
    the result so far after each of them (a run cut off mid-model keeps the frameworks done)."""
    import numpy as np
    import torch

    import torch_models

    spec = MODELS[name]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch, args.image_size, args.image_size, 3), np.uint8)
    labels = (np.arange(args.batch) % 2).astype(np.int32)
    torch.manual_seed(0)
    net = torch_model(spec, args)
    arrays = torch_models.jax_arrays(net)
    initial = {k: v.detach().clone() for k, v in net.state_dict().items()}
    result = {"model": name, "her2jax_model": spec["jax"], "torch_model": spec["torch"],
              "torch_parameters": torch_models.parameter_count(net)}
    runs = [("her2jax", lambda: jax_run(spec, args, arrays, images, labels))]
    if not args.her2jax_only:
        runs.append(("torch_eager", lambda: torch_run(net, spec, images, labels, args, False)))
    if args.compile:
        def compiled_run():
            fresh = torch_model(spec, args)
            fresh.load_state_dict(initial)
            return torch_run(fresh, spec, images, labels, args, True)
        runs.append(("torch_compile", compiled_run))
    for label, run in runs:
        # One framework failing (an out-of-memory, a torch.compile error on a new release) must
        # not lose the others' figures from a one-off device run: record it and go on.
        try:
            with RssPeak() as memory:
                result[label] = run()
        except Exception as error:  # noqa: BLE001 (reported in the table and the JSON)
            result[label] = {"error": f"{type(error).__name__}: {error}"}
            print(f"  {name} {label}: FAILED {result[label]['error']}", file=sys.stderr,
                  flush=True)
            _trim()
        else:
            if args.device == "cpu":
                result[label]["peak_memory_bytes"] = memory.growth
            print(f"  {name} {label}: {result[label]['images_per_s']:.2f} images/s",
                  file=sys.stderr, flush=True)
            _trim()
        derive(result, args)
        if on_update is not None:
            on_update(result)
    return result


def derive(result: dict[str, Any], args) -> dict[str, Any]:
    """Ratios to her2jax, FLOPs per image and MFU from the frameworks measured so far."""
    jax_rate = result.get("her2jax", {}).get("images_per_s")
    for label in ("torch_eager", "torch_compile"):
        if jax_rate and "images_per_s" in result.get(label, {}):
            result[f"ratio_vs_{label}"] = jax_rate / result[label]["images_per_s"]
    flops = result.get("her2jax", {}).get("flops_per_step")
    if flops is None:
        return result
    result["gflops_per_image"] = flops / args.batch / 1e9
    if args.peak_flops:
        for label in ("her2jax", "torch_eager", "torch_compile"):
            if "images_per_s" in result.get(label, {}):
                steps_per_s = result[label]["images_per_s"] / args.batch
                result[label]["mfu"] = flops * steps_per_s / args.peak_flops
    return result


def failures(results: list[dict]) -> list[str]:
    """'model framework: error' for every run that raised."""
    return [f"{r['model']} {label}: {r[label]['error']}" for r in results
            for label in ("her2jax", "torch_eager", "torch_compile")
            if "error" in r.get(label, {})]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(args) -> dict[str, Any]:
    import importlib.metadata as metadata

    import jax
    import torch

    versions = {"python": platform.python_version()}
    for package in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "torchvision", "timm"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    device = jax.devices()[0]
    info = {"versions": versions, "jax_device": f"{device.platform} ({device.device_kind})",
            "cpu": cpu_model(), "cpu_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "xla_flags": os.environ.get("XLA_FLAGS")}
    if args.compile:
        info["torch_compile_backend"] = args.compile_backend
    if any(MODELS[name]["family"] == "vit" for name in args.models):
        from her2jax.models import vit

        # what --vit_attention comes to here ('auto' and 'cudnn' run 'xla' where cuDNN cannot)
        usable = vit.cudnn_attention_usable(args.dtype, warn=False)
        info["vit_attention_kernel"] = ("cudnn" if args.vit_attention != "xla" and usable
                                        else "xla")
    if args.device == "gpu":
        info["torch_device"] = torch.cuda.get_device_name(0)
        info["torch_float32_matmul_precision"] = torch.get_float32_matmul_precision()
        info["jax_default_matmul_precision"] = str(jax.config.jax_default_matmul_precision)
    return info


def peak_flops(args, device_name: str) -> float | None:
    if args.device != "gpu":
        return None
    for (kind, dtype), value in PEAKS.items():
        if kind in device_name and dtype == args.dtype:
            return value
    return None


def mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f}"


def attention_note(args, info: dict) -> str:
    """The table's first line names the ViT attention kernel asked for when the rows do not say
    what ran (files written before it was recorded)."""
    requested = getattr(args, "vit_attention", "xla")
    if "vit_attention_kernel" in info or requested in ("xla", "auto"):
        return ""
    return f", her2jax ViT attention_kernel {requested}"


def row_name(result: dict, info: dict) -> str:
    """The model, for ViTs with the attention kernel her2jax ran: 'vit_base16 (cudnn attention)'."""
    kernel = info.get("vit_attention_kernel")
    if kernel and MODELS.get(result["model"], {}).get("family") == "vit":
        return f"{result['model']} ({kernel} attention)"
    return result["model"]


def table(results: list[dict], args, info: dict) -> str:
    with_compile = args.compile
    lines = [f"{args.image_size}x{args.image_size} images, batch {args.batch}, {args.dtype}, "
             f"median of {args.repeats} windows of {args.steps} steps after {args.warmup} "
             f"warm-up, device {info['jax_device']}"
             + attention_note(args, info)
             + (f" / {info['torch_device']}" if "torch_device" in info else "")
             + f", {info['cpu_cores']} CPU cores, torch threads {info['torch_threads']}"]
    header = ["model", "her2jax img/s", "PyTorch eager img/s", "ratio (her2jax / eager)"]
    if with_compile:
        header += ["torch.compile img/s", "ratio (her2jax / compile)", "torch.compile s"]
    header += ["JAX compile s", "GFLOPs / image (train step)", "peak memory MiB (her2jax / eager"
               + (" / compile" if with_compile else "") + ")"]
    if args.peak_flops:
        header.append("MFU (her2jax / eager" + (" / compile" if with_compile else "") + ")")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def rate(part):
        if part is None:
            return "not run"
        if "error" in part:
            return "failed"
        return f"{part['images_per_s']:.2f} ({part['min']:.2f}-{part['max']:.2f})"

    def number(value, pattern):
        return "n/a" if value is None else pattern.format(value)

    for result in results:
        labels = ["her2jax", "torch_eager"] + (["torch_compile"] if with_compile else [])
        row = [row_name(result, info), rate(result.get("her2jax")),
               rate(result.get("torch_eager")),
               number(result.get("ratio_vs_torch_eager"), "{:.2f}")]
        if with_compile:
            row += [rate(result.get("torch_compile")),
                    number(result.get("ratio_vs_torch_compile"), "{:.2f}"),
                    number(result.get("torch_compile", {}).get("compile_s"), "{:.1f}")]
        row += [number(result.get("her2jax", {}).get("compile_s"), "{:.1f}"),
                number(result.get("gflops_per_image"), "{:.2f}"),
                " / ".join(mib(result.get(label, {}).get("peak_memory_bytes"))
                           for label in labels)]
        if args.peak_flops:
            row.append(" / ".join(number(result.get(label, {}).get("mfu"), "{:.1%}")
                                  for label in labels))
        lines.append("| " + " | ".join(row) + " |")
    if args.peak_flops:
        lines.append(f"MFU peak: {args.peak_flops / 1e12:.0f} TFLOP/s ({args.dtype}); "
                     f"{PEAK_NOTE}")
    lines += [f"FAILED {line}" for line in failures(results)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    setup_environment(args.device)
    here = os.path.dirname(os.path.abspath(__file__))
    for path in (here, os.path.dirname(here)):
        if path not in sys.path:
            sys.path.insert(0, path)
    import torchvision  # noqa: F401  (before anything else heavy; see tests/conftest.py)
    import torch

    if args.device == "gpu" and not torch.cuda.is_available():
        raise SystemExit("--device gpu: PyTorch sees no CUDA device")
    info = environment(args)
    if args.device == "gpu" and "cpu" in info["jax_device"]:
        raise SystemExit("--device gpu: JAX found no GPU")
    args.peak_flops = peak_flops(args, info.get("torch_device", ""))
    memory_method = ("CPU: growth of the sampled resident set over each framework's phase"
                     if args.device == "cpu" else
                     "GPU: JAX peak_bytes_in_use (process high-water mark), "
                     "torch.cuda.max_memory_allocated (reset per model)")
    results: list[dict] = []

    def output(complete: bool) -> dict[str, Any]:
        text = table(results, args, info)
        written = {"arguments": {k: v for k, v in vars(args).items() if k != "peak_flops"},
                   "peak_flops": args.peak_flops,
                   "peak_note": PEAK_NOTE if args.peak_flops else None,
                   "memory_method": memory_method, "environment": info, "results": results,
                   "failures": failures(results), "complete": complete, "table": text}
        if args.json:   # rewritten after every framework: a run cut short keeps what it measured
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            partial = args.json + ".partial"
            with open(partial, "w") as handle:
                json.dump(written, handle, indent=1)
            os.replace(partial, args.json)
        return written

    for name in args.models:
        results.append({"model": name})

        def update(so_far: dict[str, Any]) -> None:   # after each framework of this model
            results[-1] = so_far
            output(complete=False)

        results[-1] = run_model(name, args, update)
        output(complete=False)
    final = output(complete=True)
    print(final["table"], flush=True)
    return final


if __name__ == "__main__":
    sys.exit(1 if main()["failures"] else 0)
