"""A run folder: what training writes and every other tool reads, named in one place.

    RUN/config.json                  the newest launch's config (ml_collections as JSON)
    RUN/launches.jsonl               one line per launch: when, from which step, what changed
    RUN/preparation.json             how the run's training data was prepared
    RUN/metrics.jsonl                one JSON object per training log line and evaluation
    RUN/tensorboard/                 TensorBoard events
    RUN/checkpoints/<step>/          the latest checkpoints (orbax)
    RUN/best/<step>/                 the checkpoint of the best validation patient AUC
    RUN/eval/<split>/                `evaluate` on the best checkpoint: metrics.json,
                                     predictions.csv, report.md, figures, explain/
    RUN/eval/<split>_<checkpoint>/   `evaluate` on another checkpoint
    RUN/eval/validation_threshold.json   the validation thresholds, per checkpoint

Train, evaluate, predict, explain, compare, the sweep launcher and collector, `prepare --like`
and the demo all reach these files through `RunFolder`. Importing this module loads neither
JAX nor TensorFlow; `restore` imports JAX, Flax and orbax when called.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from etils import epath

from her2jax.errors import MissingInput

CONFIG_FILE = "config.json"
LAUNCHES_FILE = "launches.jsonl"
PREPARATION_FILE = "preparation.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = ("checkpoints", "best")


class NotARunFolder(MissingInput):
    """A folder given as a run folder lacks what training writes."""


def absolute(path: str | epath.Path) -> epath.Path:
    """A local path made absolute (orbax refuses relative ones); buckets (gs://...) as given."""
    if "://" in str(path):
        return epath.Path(path)
    return epath.Path(path).expanduser().resolve()


@dataclasses.dataclass(frozen=True)
class Restored:
    """A trained model read back from a run folder (in eval mode)."""
    model: Any
    config: Any                  # ml_collections.ConfigDict
    step: int
    checkpoint: str              # "best", "latest" or the step asked for
    preparation: dict[str, Any]  # how the run's training data was prepared
    workdir: str


class RunFolder:
    """The files of one run, by role (see the module docstring)."""

    def __init__(self, path: str | epath.Path):
        self.path = absolute(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # ------------------------------------------------------------ paths
    @property
    def config_file(self) -> epath.Path:
        return self.path / CONFIG_FILE

    @property
    def launches_file(self) -> epath.Path:
        return self.path / LAUNCHES_FILE

    @property
    def preparation_file(self) -> epath.Path:
        return self.path / PREPARATION_FILE

    @property
    def metrics_file(self) -> epath.Path:
        return self.path / METRICS_FILE

    @property
    def tensorboard(self) -> epath.Path:
        return self.path / "tensorboard"

    def checkpoints(self, kind: str = "checkpoints") -> epath.Path:
        """The folder of the latest ("checkpoints") or the best ("best") checkpoints."""
        if kind not in CHECKPOINTS:
            raise ValueError(f"checkpoint kind must be one of {CHECKPOINTS}, got {kind!r}")
        return self.path / kind

    def eval_dir(self, split: str, checkpoint: str | int = "best") -> epath.Path:
        """RUN/eval/<split> for the best checkpoint (what compare, collect and the demo read),
        RUN/eval/<split>_<checkpoint> for any other."""
        name = split if str(checkpoint) == "best" else f"{split}_{checkpoint}"
        return self.path / "eval" / name

    def eval_metrics(self, split: str = "test") -> epath.Path:
        return self.eval_dir(split) / "metrics.json"

    def predictions(self, split: str) -> epath.Path:
        return self.eval_dir(split) / "predictions.csv"

    @property
    def validation_thresholds(self) -> epath.Path:
        return self.path / "eval" / "validation_threshold.json"

    # ------------------------------------------------------------ contents
    def evaluated(self, split: str = "test") -> bool:
        """`evaluate` has written this split's metrics (a sweep's run is then finished)."""
        return self.eval_metrics(split).exists()

    def config_dict(self) -> dict[str, Any]:
        """config.json as plain JSON; NotARunFolder when it is missing."""
        if not self.config_file.exists():
            raise NotARunFolder(f"{self.path} is not a run folder (no {CONFIG_FILE}); train "
                                f"first with python -m her2jax.main --workdir {self.path}")
        return json.loads(self.config_file.read_text(encoding="utf-8"))

    def config(self):
        """config.json as an ml_collections.ConfigDict."""
        import ml_collections

        return ml_collections.ConfigDict(self.config_dict())

    def preparation(self) -> dict[str, Any]:
        """preparation.json; NotARunFolder when it is missing."""
        if not self.preparation_file.exists():
            raise NotARunFolder(f"{self.path} is not a run folder (no {PREPARATION_FILE})")
        return json.loads(self.preparation_file.read_text(encoding="utf-8"))

    def steps(self, kind: str = "checkpoints") -> list[int]:
        """The steps of the checkpoints of `kind` on disk, ascending."""
        folder = self.checkpoints(kind)
        if not folder.exists():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())

    def default_step(self) -> int | None:
        """The step evaluate and explain restore by default: the best checkpoint, else the
        latest (None before the first checkpoint)."""
        for kind in ("best", "checkpoints"):
            steps = self.steps(kind)
            if steps:
                return steps[-1]
        return None

    def metrics_records(self) -> list[dict[str, Any]]:
        """metrics.jsonl's objects in file order; lines that do not parse (one cut short by an
        interruption) are skipped."""
        if not self.metrics_file.exists():
            return []
        records = []
        for line in self.metrics_file.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    # ------------------------------------------------------------ checkpoints
    def managers(self, keep: int):
        """(latest, best) orbax CheckpointManagers for training: `keep` latest checkpoints, the
        one best by validation patient AUC."""
        import orbax.checkpoint as ocp

        # Each manager commits from a background thread behind barriers named by the step; two
        # managers saving one step at once (the latest and the best; the members of a pack) need
        # their own barrier names, or one's process 0 pairs with the other's process 1.
        folder = hashlib.sha256(str(self.path).encode()).hexdigest()[:12]

        def options(kind: str, **kwargs: Any) -> Any:
            return ocp.CheckpointManagerOptions(
                create=True, multiprocessing_options=ocp.options.MultiprocessingOptions(
                    barrier_sync_key_prefix=f"her2jax-{kind}-{folder}"), **kwargs)

        latest = ocp.CheckpointManager(self.checkpoints("checkpoints"),
                                       options=options("latest", max_to_keep=keep))
        best = ocp.CheckpointManager(self.checkpoints("best"), options=options(
            "best", max_to_keep=1, best_fn=lambda m: m["patient_auc"], best_mode="max"))
        return latest, best

    def restore(self, checkpoint: str | int = "best", mesh: Any = None) -> Restored:
        """The model at `checkpoint`: "best" (highest validation patient AUC; the latest when
        no validation AUC was ever defined), "latest", or a step of the latest checkpoints."""
        import jax
        import orbax.checkpoint as ocp
        from flax import nnx

        from her2jax import models
        from her2jax.training import optim, steps

        config = self.config()
        preparation = self.preparation()
        mesh = mesh or steps.data_mesh()
        # shapes only: the checkpoint supplies every value, so nothing is initialised or compiled
        model = nnx.eval_shape(lambda: models.from_config(config, preparation["image_size"]))
        _, _, params, rest = steps.split_model(model)
        state = {"params": params, "rest": rest,
                 "opt_state": jax.eval_shape(optim.from_config(config, params).init, params)}
        kind = "best" if checkpoint == "best" else "checkpoints"
        label = str(checkpoint)
        manager = ocp.CheckpointManager(self.checkpoints(kind))
        try:
            available = sorted(manager.all_steps())   # committed checkpoints only
            if checkpoint == "best" and not available:
                # no validation AUC was ever defined (e.g. a validation split with one class)
                manager.close()
                kind = "checkpoints"
                label = "latest (no best: the validation AUC was never defined)"
                manager = ocp.CheckpointManager(self.checkpoints(kind))
                available = sorted(manager.all_steps())
            if checkpoint in ("best", "latest"):
                step = max(available, default=None)
            else:
                step = int(checkpoint) if int(checkpoint) in available else None
            if step is None:
                raise MissingInput(f"no checkpoint {checkpoint!r} in "
                                   f"{self.checkpoints(kind)} (steps there: "
                                   f"{available or 'none'})")
            replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            target = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)
            state = manager.restore(step, args=ocp.args.StandardRestore(target))
        finally:
            manager.close()
        nnx.update(model, state["params"], state["rest"])
        model.eval()
        return Restored(model, config, step, label, preparation, str(self.path))
