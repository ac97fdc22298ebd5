"""Sweeps as data: a sweep file's `get_sweep(arg)` returns a `Sweep`, a list of `Run`s built with
`product`, `zip_axes` and `seeds`, plus the prepared-data variants the runs need.

    from launch.spec import Sweep, axis, product, seeds
    def get_sweep(arg=None):
        return Sweep("attention", runs=product(
            axis("config", ["configs/resnet.py:resnet18", "configs/resnet.py:resnet34"]),
            axis("model.kwargs.attention", ["none", "channel", "dual"]),
            seeds(3)), data={"q98": {"normalization": "per_channel_clip_q98"}})

A run is a config file (with its variant), `--config.*` overrides, a seed and the name of a data
variant. Its name is stable: the same definition gives the same name in every session, so a
relaunch finds the runs already done. The launcher names runs by what sets them apart from the
sweep's other runs (`readable_names`: `<variant>-<alias>=<value>...-s<seed>`); a Run on its
own is named by every setting (`Run.full_group`), shortened with a hash when long.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from data_prep.params import IMAGE_PARAMETERS
from her2jax.errors import InvalidSetting

MAX_NAME = 96
# where the study sweeps' runs find converted ImageNet weights; `launch.sweep --weights_dir`
# sets it before the sweep file runs
WEIGHTS_DIR = "weights"


def imagenet(model: str) -> str:
    """The converted ImageNet weights a study sweep's run of `model` loads:
    WEIGHTS_DIR/<model>.safetensors (written by `python -m her2jax.convert`; README "ImageNet
    weights")."""
    return f"{WEIGHTS_DIR.rstrip('/')}/{model}.safetensors"


@dataclasses.dataclass(frozen=True)
class Run:
    config: str                                  # "configs/resnet.py:resnet18"
    overrides: tuple[tuple[str, Any], ...] = ()  # (("optimizer.learning_rate", 1e-3), ...)
    seed: int = 0
    data: str | None = None                      # a key of Sweep.data
    # the name its sweep gives it (`readable_names`): what sets it apart from the sweep's other
    # runs; None: the full name of every setting (`full_group`)
    label: str | None = dataclasses.field(default=None, compare=False)

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.overrides)

    @property
    def variant(self) -> str:
        return _slug(self.config.rsplit(":", 1)[-1] if ":" in self.config else
                     self.config.rsplit("/", 1)[-1].removesuffix(".py"))

    @property
    def group(self) -> str:
        """The configuration without its seed: runs of one group differ only by seed."""
        return self.label or self.full_group

    @property
    def full_group(self) -> str:
        """Every setting in the name, hashed when long (the names of sweeps launched before
        `readable_names`: their folders keep these)."""
        parts = [self.variant]
        if self.data:
            parts.append(f"data={_slug(self.data)}")
        shorts = [_short(key) for key, _ in self.overrides]
        parts += [f"{short if shorts.count(short) == 1 else key}={_slug(value)}"
                  for short, (key, value) in zip(shorts, self.overrides)]
        name = "-".join(parts)
        if len(name) > MAX_NAME:
            digest = hashlib.sha1(json.dumps(self._identity(with_seed=False),
                                             sort_keys=True).encode()).hexdigest()[:8]
            name = f"{name[:MAX_NAME - 9]}~{digest}"
        return name

    @property
    def name(self) -> str:
        return f"{self.group}-s{self.seed}"

    def _identity(self, with_seed: bool = True) -> dict[str, Any]:
        identity = {"config": self.config, "overrides": [list(o) for o in self.overrides],
                    "data": self.data}
        if with_seed:
            identity["seed"] = self.seed
        return identity

    def factor(self, key: str) -> Any:
        """The value this run gives `key` (an override key, 'config', 'data' or 'seed')."""
        if key in ("config", "seed", "data"):
            return getattr(self, key)
        return self.settings.get(key)


@dataclasses.dataclass
class Sweep:
    name: str
    runs: list[Run]
    data: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    pivot: tuple[str, str] | None = None     # (rows, columns) of the paper's ablation table
    description: str = ""
    # runs per pack (`launch.packs`) when `launch.sweep --pack` is not given; None: unpacked
    pack: int | None = None

    def __post_init__(self) -> None:
        names = [run.name for run in self.runs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise InvalidSetting(f"sweep {self.name}: runs with the same definition {duplicates}")
        unknown = sorted({run.data for run in self.runs if run.data} - set(self.data))
        if unknown:
            raise InvalidSetting(f"sweep {self.name}: runs use undeclared data variants {unknown}")
        for variant, options in self.data.items():
            extra = set(options) - set(PREPARE_OPTIONS)
            if extra:
                raise InvalidSetting(f"sweep {self.name}: data variant {variant!r} has unknown "
                                     f"preparation options {sorted(extra)}")


# preparation options a data variant may set (flags of data_prep.prepare)
PREPARE_OPTIONS = (*IMAGE_PARAMETERS, "split_seed")

Axis = list[dict[str, Any]]


def axis(key: str, values: Iterable[Any]) -> Axis:
    """One dimension of a sweep: `key` is 'config', 'data', 'seed' or a config key such as
    'optimizer.learning_rate' or 'model.kwargs.attention'."""
    values = list(values)
    if not values:
        raise InvalidSetting(f"axis {key!r} has no values")
    return [{key: value} for value in values]


def seeds(count: int, start: int = 0) -> Axis:
    return axis("seed", range(start, start + count))


def product(*axes: Axis, base: Mapping[str, Any] | None = None) -> list[Run]:
    """Every combination of the axes' points (the last axis varies fastest)."""
    return [_run({**(base or {}), **_merge(points)}) for points in itertools.product(*axes)]


def zip_axes(*axes: Axis) -> Axis:
    """Points taken together, i-th with i-th (the axes must have the same length): an axis for
    `product`, e.g. zip_axes(axis('config', configs), axis('optimizer.learning_rate', lrs))."""
    lengths = {len(a) for a in axes}
    if len(lengths) != 1:
        raise InvalidSetting(f"zip_axes needs axes of one length, got {sorted(lengths)}")
    return [_merge(points) for points in zip(*axes)]


def runs_of(points: Sequence[Mapping[str, Any]], base: Mapping[str, Any] | None = None
            ) -> list[Run]:
    """Runs from explicit points (for random searches)."""
    return [_run({**(base or {}), **point}) for point in points]


def _merge(points: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for point in points:
        clash = set(merged) & set(point)
        if clash:
            raise InvalidSetting(f"two axes set {sorted(clash)}")
        merged.update(point)
    return merged


def _run(point: Mapping[str, Any]) -> Run:
    point = dict(point)
    if "config" not in point:
        raise InvalidSetting(f"a run needs a 'config' (e.g. configs/resnet.py:resnet18): {point}")
    config = point.pop("config")
    seed = int(point.pop("seed", 0))
    data = point.pop("data", None)
    return Run(config=config, overrides=tuple(sorted(point.items())), seed=seed, data=data)


# short names of the keys sweeps vary most
ALIASES = {"model.name": "model", "optimizer.learning_rate": "lr", "optimizer.weight_decay": "wd",
           "model.kwargs.dropout": "drop", "loss.label_smoothing": "ls", "optimizer.b1": "b1",
           "optimizer.b2": "b2", "model.kwargs.attention": "att", "model.kwargs.placement": "place",
           "model.kwargs.head": "head", "init.pretrained": "init",
           "batch_size": "bs", "total_steps": "steps", "loss.class_weights": "cw",
           "input.balance": "balance", "model.kwargs.drop_path": "dp"}


def readable_names(runs: Sequence[Run]) -> list[Run]:
    """The runs labelled with what sets each configuration apart from the others of the sweep:
    the config variant, then each key whose value differs between configurations (data
    variant, overrides), as `alias=value` with short aliases (lr, wd, drop, ls, ...) and compact
    values (3.2e-04 -> 0.00032, a weight file -> its name, '' -> none). Keys every run shares
    (a `--set`) are left out. Names depend only on the runs' definitions, so the same sweep
    gives the same names in every launch; configurations the compact values cannot tell apart
    get a short hash."""
    def identity(run: Run) -> str:
        return json.dumps(run._identity(with_seed=False), sort_keys=True, default=str)

    groups: dict[str, Run] = {}
    for run in runs:
        groups.setdefault(identity(run), run)
    order = list(ALIASES)
    keys = ["data"] + sorted({key for run in groups.values() for key, _ in run.overrides},
                             key=lambda key: (order.index(key) if key in order else len(order),
                                              key))
    varying = [key for key in keys
               if len({repr(_value_of(run, key)) for run in groups.values()}) > 1]
    shorts = [ALIASES.get(key) or _short(key) for key in varying]
    labels = {}
    for group, run in groups.items():
        parts = [run.variant]
        for key, short in zip(varying, shorts):
            name = short if shorts.count(short) == 1 else key
            parts.append(f"{name}={_compact(_value_of(run, key))}")
        labels[group] = "-".join(parts)
    counts = collections.Counter(labels.values())
    for group, label in labels.items():
        if counts[label] > 1 or len(label) > MAX_NAME:
            digest = hashlib.sha1(group.encode()).hexdigest()[:8]
            labels[group] = f"{label[:MAX_NAME - 9]}~{digest}"
    return [dataclasses.replace(run, label=labels[identity(run)]) for run in runs]


def _value_of(run: Run, key: str) -> Any:
    return run.data if key == "data" else run.settings.get(key)


def _compact(value: Any) -> str:
    if value is None or value == "":
        return "none"
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return _slug(f"{value:.4g}")
        mantissa, exponent = f"{value:.3e}".split("e")
        return f"{float(mantissa):g}e{int(exponent)}"          # 8.11e-05 -> 8.11e-5
    if isinstance(value, str) and ("/" in value or value.endswith(".safetensors")):
        value = value.rstrip("/").rsplit("/", 1)[-1].removesuffix(".safetensors")
    return _slug(value)


def _short(key: str) -> str:
    """'model.kwargs.attention' -> 'attention', 'optimizer.learning_rate' -> 'learning_rate'."""
    return key.rsplit(".", 1)[-1]


def _slug(value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:g}"
    return re.sub(r"[^A-Za-z0-9_.+]+", "_", str(value)).strip("_") or "_"
