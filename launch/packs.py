"""A sweep's runs grouped into packs: runs that differ only in keys that can vary inside one
compiled step (`her2jax.training.pack_keys.PACK_KEYS`: seed, learning rate, weight decay, betas,
label smoothing, dropout, class weights, the augmentation magnitudes) train together, at most K
at a time, as one process (`python -m her2jax.main ... --member ...`); each keeps its own run
folder, name and manifest entry. Every run of a packed sweep, a pack of one included, draws its
batches on the device (`DEVICE_SETTINGS`), so a run resumes under the same settings however the
packs fall.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any

from her2jax.errors import InvalidSetting
from her2jax.training.pack_keys import DEVICE_SETTINGS, PACK_KEYS, augment_steps_on
from launch.spec import Run


AUTO = "auto"


def parse_pack(text: str | int | None) -> int | str | None:
    """'8' -> 8; 'auto' -> AUTO (as many as fit the device, measured); 'off' (or None) -> None:
    runs as configured, one process each."""
    if text is None or text == "off":
        return None
    if text == AUTO:
        return AUTO
    try:
        size = int(text)
    except ValueError:
        raise InvalidSetting(f"--pack {text!r}: a number of runs (K >= 1), 'auto' or "
                             f"'off'") from None
    if size < 1:
        raise InvalidSetting(f"--pack {size}: a pack holds at least one run")
    return size


@dataclasses.dataclass(frozen=True)
class Job:
    """What one process trains: one run, or the members of a pack (the first one's folder and
    config are the command's own)."""
    runs: tuple[Run, ...]

    @property
    def packed(self) -> bool:
        return len(self.runs) > 1

    @property
    def name(self) -> str:
        if not self.packed:
            return self.runs[0].name
        digest = hashlib.sha1(json.dumps([r.name for r in self.runs]).encode()).hexdigest()[:8]
        return f"pack{len(self.runs)}-{self.runs[0].group[:60]}~{digest}"


def pack_key(run: Run) -> tuple[Any, ...]:
    """Runs with equal keys may share a pack: one config, one data variant, the same override
    keys, equal values outside PACK_KEYS, the same augmentation steps on."""
    fixed = tuple((key, json.dumps(value, sort_keys=True)) for key, value in run.overrides
                  if key not in PACK_KEYS)
    return (run.config, run.data, tuple(key for key, _ in run.overrides), fixed,
            augment_steps_on(dict(run.overrides)))


def group(runs: Sequence[Run], size: int | Callable[[Run], int] | None,
          step_of: Callable[[Run], int] = lambda run: 0) -> list[Job]:
    """Jobs for `runs` in their order: without packing (`size` None) one per run; otherwise
    packs of at most `size` runs (or `size(first run of the group)`) of one `pack_key` and one
    checkpoint step (`step_of`: a pack resumes only members stopped at the same step), filled
    in the order the runs come."""
    if size is None:
        return [Job((run,)) for run in runs]
    groups: dict[tuple[Any, ...], list[Run]] = {}
    for run in runs:
        groups.setdefault((*pack_key(run), step_of(run)), []).append(run)
    jobs = []
    for members in groups.values():
        k = size(members[0]) if callable(size) else size
        jobs += [Job(tuple(members[i:i + k])) for i in range(0, len(members), k)]
    order = {run.name: i for i, run in enumerate(runs)}
    return sorted(jobs, key=lambda job: order[job.runs[0].name])


def check_settings(settings: dict[str, Any]) -> None:
    """Packed runs draw their batches on the device: `--set` may not say otherwise."""
    for key, value in DEVICE_SETTINGS.items():
        if key in settings and settings[key] != value:
            raise InvalidSetting(f"--set {key}={settings[key]}: packed runs need {key}={value} "
                                 f"(or --pack off)")


def device_flags() -> list[str]:
    return [f"--config.{key}={value}" for key, value in DEVICE_SETTINGS.items()]


def member_flag(run: Run, workdir: str) -> str:
    """`--member JSON` for a pack mate: its folder, seed and packable overrides."""
    changes = {"seed": run.seed, **{key: value for key, value in run.overrides
                                    if key in PACK_KEYS}}
    return "--member=" + json.dumps({"workdir": workdir, "config": changes}, sort_keys=True)
