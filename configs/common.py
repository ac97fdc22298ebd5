"""Settings shared by every experiment. Each key is documented where it is set; durations carry
their unit in the name (`total_steps`, `warmup_steps`, `log_every_steps`).

Variants are chosen on the command line, big_vision style:
    --config configs/resnet.py:resnet18            a named variant
    --config configs/resnet.py:resnet18,runlocal   the same, shrunk to a smoke test
    --config.optimizer.learning_rate=3e-4          any key; unknown keys fail loudly
"""
from __future__ import annotations

import difflib
import importlib.util
import os
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from her2jax.data.augment_options import DEFAULT_AUGMENT
from her2jax.errors import InvalidSetting, MissingInput


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.data_dir = ""              # prepared dataset folder (.../her2_dce/<config>/<version>)
    config.train_split = "train"
    config.eval_split = "validation"  # periodic evaluation and the best checkpoint
    config.seed = 0                   # model initialisation and the input stream

    config.model = ml_collections.ConfigDict()
    config.model.name = "resnet18"    # a name from `python -m her2jax.models`
    config.model.kwargs = ml_collections.ConfigDict()  # its options (attention, head, ...)
    config.num_classes = 2
    config.dtype = "float32"          # compute dtype; bfloat16 on GPU/TPU (params stay float32)
    config.pack_layout = "auto"       # a pack's members: auto | vmap | map (README "Packed runs")
    config.pack_devices = "auto"      # a pack over several devices: auto | data | members (README)

    config.init = ml_collections.ConfigDict()
    config.init.pretrained = ""       # converted weights (python -m her2jax.convert); "" = random

    config.batch_size = 32            # global batch, split over all devices and processes
    config.total_steps = 2000         # optimiser updates
    # linear warm-up of the learning rate: warmup_fraction of total_steps (rounded), unless
    # warmup_steps >= 0 sets it in steps (which must be < total_steps)
    config.warmup_steps = -1
    config.warmup_fraction = 0.05

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.learning_rate = 1e-3   # peak AdamW learning rate, cosine to 0 at the end
    config.optimizer.weight_decay = 0.05    # not on biases, norms, position embeddings
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.grad_clip_norm = 1.0   # global-norm clipping; 0 disables it
    config.optimizer.backbone_multiplier = 1.0  # learning-rate factor for the pretrained backbone
    config.optimizer.accumulation_steps = 1     # micro-batches per update

    config.loss = ml_collections.ConfigDict()
    config.loss.label_smoothing = 0.0
    config.loss.class_weights = True  # w_c = N / (C n_c) from the training split's slice counts

    config.input = ml_collections.ConfigDict()
    config.input.balance = "none"     # none | class | patient (sampling of training slices)
    # training only, evaluation never: crop, flip, rotation, intensity (see DEFAULT_AUGMENT)
    config.input.augment = ml_collections.ConfigDict(DEFAULT_AUGMENT)
    # where the augmentation runs: host (tf.data, on the CPU) | device (in the jitted train step,
    # on the accelerator: the host only decodes; for fast accelerators, see README)
    config.input.augment_on = "host"
    # where training reads its data: tfrecord (tf.data on the host, every step) | device (both
    # splits read once and kept on the accelerator, batches drawn there; needs augment_on=device;
    # see README "Data on the devices")
    config.input.source = "tfrecord"

    config.eval = ml_collections.ConfigDict()
    config.eval.every_steps = 200
    config.eval.batch_size = 64
    config.eval.aggregation = "median"  # slice -> patient probability: median | mean | max

    config.log_every_steps = 20
    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 200
    config.checkpoint.keep = 2          # latest checkpoints kept for resuming (best kept apart)
    return config


def family_config(arg: str | None, variants: Mapping[str, Any], default: str,
                  build: Callable[[ml_collections.ConfigDict, str], None]
                  ) -> ml_collections.ConfigDict:
    """The config `<variant>[,runlocal]` of one family of models: the base config, then
    `build(config, variant)` sets the model, then the runlocal shrink when asked."""
    variant, flags = parse_arg(arg)
    variant = variant or default
    if variant not in variants:
        raise InvalidSetting(f"unknown variant {variant!r}; choose from {sorted(variants)}")
    config = base_config()
    build(config, variant)
    if "runlocal" in flags:
        apply_runlocal(config)
    return config


def parse_arg(arg: str | None) -> tuple[str | None, set[str]]:
    """'resnet18,runlocal' -> ('resnet18', {'runlocal'})."""
    parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
    flags = {p for p in parts if p == "runlocal"}
    variants = [p for p in parts if p not in flags]
    if len(variants) > 1:
        raise InvalidSetting(f"one variant at a time, got {variants}")
    return (variants[0] if variants else None), flags


def apply_runlocal(config: ml_collections.ConfigDict) -> None:
    """A smoke test on a laptop CPU: few steps, small batches."""
    config.batch_size = 8
    config.total_steps = 6
    config.warmup_steps = 2
    config.eval.every_steps = 3
    config.eval.batch_size = 8
    config.log_every_steps = 2
    config.checkpoint.every_steps = 3


def load_file(path: str, kind: str):
    """The Python file `path` (a config or sweep file) as a module; FileNotFoundError naming it."""
    if not os.path.isfile(path):
        raise MissingInput(f"no {kind} file {path}")
    module_spec = importlib.util.spec_from_file_location(
        f"her2jax_{kind}_{os.path.basename(path).removesuffix('.py')}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def load(spec: str) -> ml_collections.ConfigDict:
    """`configs/resnet.py:resnet18` -> that config, read as `--config` reads it (no overrides)."""
    path, sep, arg = spec.partition(":")
    module = load_file(path, "config")
    return module.get_config(arg) if sep else module.get_config()


def unknown_key(config: ml_collections.ConfigDict, key: str) -> str | None:
    """Why `key` ('optimizer.learning_rate') names no setting of `config`, with the closest
    name; None when it names one."""
    node, path = config, []
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict):
            return f"config.{'.'.join(path)} is a value, not a group of keys"
        if part not in node:
            where = ".".join(["config", *path])
            close = difflib.get_close_matches(part, list(node.keys()), n=1)
            hint = (f'; did you mean "{".".join([*path, close[0]])}"?' if close else
                    f" (its keys: {', '.join(sorted(node.keys()))})")
            return f"{where} has no key {part!r}{hint}"
        node = node[part]
        path.append(part)
    return None
