"""What a run writes as it goes: `metrics.jsonl`, TensorBoard events, and a console line with
loss, learning rate, images per second and the time left; `config.json` (the newest launch's
config) and `launches.jsonl` (one line per launch: when, from which step, what changed). Only
process 0 writes.

The run folder may be a bucket (`gs://...`): object stores cannot append, so there the metrics
file is rewritten whole at each record, and TensorBoard events are written to a local folder and
copied up after each evaluation and at the end."""
from __future__ import annotations

import datetime
import json
import math
import sys
import tempfile
import time
from typing import Any

import numpy as np
from etils import epath

from her2jax import files
from her2jax.errors import TrainingDiverged
from her2jax.run_folder import RunFolder
from her2jax.training.events import EventWriter


class RunLog:
    def __init__(self, workdir: epath.Path, total_steps: int, enabled: bool = True,
                 label: str = ""):
        """label: put before every printed line (the member of a pack)."""
        self.workdir = workdir
        self.label = label
        self.run = RunFolder(workdir)
        self.total_steps = total_steps
        self.enabled = enabled
        self._start = time.perf_counter()
        self._last = (self._start, None)
        self._writer = None
        self._remote = "://" in str(workdir)
        self._lines: str | None = None      # the metrics file's text, kept when remote
        self._events = None                 # local folder of the event files, when remote
        if enabled:
            if self._remote:
                self._events = epath.Path(tempfile.mkdtemp(prefix="her2jax_events_"))
            self._writer = EventWriter(self._events or self.run.tensorboard)

    def write_config(self, config) -> None:
        if self.enabled:
            files.write_text(self.run.config_file, config.to_json(indent=2))

    def launch(self, step: int, changes: dict[str, list[Any]]) -> None:
        """Records a launch starting after `step` with the settings changed since the last one
        ({key: [old, new]}; `train.RELAUNCH_KEYS`), so config.json's newest values do not hide
        the earlier ones."""
        if not self.enabled:
            return
        record = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"), "step": step, "changed": changes}
        path = self.run.launches_file    # rewritten whole: object stores cannot append
        files.write_text(path, (path.read_text(encoding="utf-8") if path.exists() else "")
                         + files.json_text(record) + "\n")
        if changes:
            self.message("changed since the last launch (see launches.jsonl): " + ", ".join(
                f"{key} {json.dumps(old)} -> {json.dumps(new)}"
                for key, (old, new) in changes.items()))

    def message(self, text: str) -> None:
        if self.enabled:
            print(f"{self.label}{text}", file=sys.stderr, flush=True)

    def _append(self, record: dict[str, Any]) -> None:
        """One JSON line; `elapsed_seconds` counts from this process's start of the run."""
        record = dict(record, elapsed_seconds=round(time.perf_counter() - self._start, 2))
        line = files.json_text(record) + "\n"
        path = self.run.metrics_file
        if not self._remote:
            with path.open("a") as handle:
                handle.write(line)
            return
        if self._lines is None:      # a resumed run continues the file
            self._lines = path.read_text(encoding="utf-8") if path.exists() else ""
        self._lines += line
        files.write_text(path, self._lines)

    def _upload_events(self) -> None:
        """Copies the local event files into the remote run folder (a no-op for local runs)."""
        if self._events is None:
            return
        target = self.run.tensorboard
        target.mkdir(parents=True, exist_ok=True)
        for event_file in self._events.iterdir():
            (target / event_file.name).write_bytes(event_file.read_bytes())

    def train(self, step: int, step_metrics: list[dict[str, Any]], learning_rate: float,
              batch_size: int) -> None:
        """Averages the metrics of the steps since the last call; stops the run on NaN/inf."""
        losses = np.array([float(m["loss"]) for m in step_metrics])
        if not np.isfinite(losses).all():
            first = step - len(losses) + 1 + int(np.argmin(np.isfinite(losses)))
            raise TrainingDiverged(
                f"loss is NaN/inf at step {first} (steps {step - len(losses) + 1}..{step}); "
                f"lower the learning rate, check the data, or resume from the last checkpoint")
        now = time.perf_counter()
        then, last_step = self._last
        # no rate for the first logged steps of a launch (compilation): null in the JSON
        rate = (len(losses) * batch_size / (now - then)) if last_step is not None else None
        self._last = (now, step)
        record = {"step": step, "split": "train", "learning_rate": learning_rate,
                  "images_per_second": rate}
        for key in step_metrics[0]:
            record[key] = float(np.mean([float(m[key]) for m in step_metrics]))
        if not self.enabled:
            return
        self._append(record)
        for key, value in record.items():
            if key not in ("step", "split") and value is not None and math.isfinite(value):
                self._writer.add_scalar(f"train/{key}", value, step)
        speed = "-" if rate is None else f"{rate:.1f}"
        eta = f"{(self.total_steps - step) * batch_size / rate / 60:.1f} min" if rate else "-"
        print(f"{self.label}step {step}/{self.total_steps}  loss {record['loss']:.4f}  "
              f"lr {learning_rate:.2e}  {speed} img/s  eta {eta}", file=sys.stderr, flush=True)

    def evaluation(self, step: int, split: str, report: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._append({"step": step, "split": split, **report})
        for key in ("auc", "accuracy", "sensitivity", "specificity", "slice_auc"):
            value = report.get(key)
            if isinstance(value, float) and math.isfinite(value):
                self._writer.add_scalar(f"{split}/{key}", value, step)
        self._writer.flush()
        self._upload_events()
        print(f"{self.label}step {step}  {split}: patient AUC {report['auc']:.3f} "
              f"[{report['auc_ci_low']:.3f}, {report['auc_ci_high']:.3f}]  accuracy "
              f"{report['accuracy']:.3f}  ({report['patients']} patients, "
              f"{report['aggregation']} of slices)", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Flushes and closes the event writer; for a remote run folder, copies the event files
        up a last time and removes their local folder."""
        if self._writer is None:
            return
        self._writer.close()
        self._upload_events()
        if self._events is not None:
            self._events.rmtree(missing_ok=True)
            self._events = None
        self._writer = None
