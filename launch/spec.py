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
relaunch finds the runs already done. Names read as `<variant>-<key>=<value>...-s<seed>`,
shortened with a hash when long.
"""
from __future__ import annotations

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

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.overrides)

    @property
    def group(self) -> str:
        """The configuration without its seed: runs of one group differ only by seed."""
        variant = self.config.rsplit(":", 1)[-1] if ":" in self.config else \
            self.config.rsplit("/", 1)[-1].removesuffix(".py")
        parts = [_slug(variant)]
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


def _short(key: str) -> str:
    """'model.kwargs.attention' -> 'attention', 'optimizer.learning_rate' -> 'learning_rate'."""
    return key.rsplit(".", 1)[-1]


def _slug(value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:g}"
    return re.sub(r"[^A-Za-z0-9_.+]+", "_", str(value)).strip("_") or "_"
