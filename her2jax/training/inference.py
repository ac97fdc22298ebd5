"""The one inference path: a model's positive-class probability for images or a prepared split.

Training's periodic evaluation, `evaluate`, `predict`, `explain` and the demo all come through
here. A `Predictor` holds the jitted eval step (`steps.make_eval_step`: ImageNet normalisation
in the compute dtype, logits, softmax in float32) with the parameters it runs, on the data mesh.
Every batch is padded to a multiple of the mesh's devices; a split is read in each process's
share and the rows of all processes are gathered before they are returned, so the caller sees
every slice of the split exactly once, in canonical order, whatever the number of devices and
processes.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from her2jax import distributed
from her2jax.training import steps

SPLIT_COLUMNS = ("patient_id", "cohort", "slice_index", "label", "probability")


def padded_batch_size(batch_size: int, devices: int) -> int:
    """The smallest multiple of `devices` that is at least `batch_size`: a batch must split
    evenly over the devices, and padding rows fill the difference."""
    return -(-batch_size // devices) * devices


@dataclasses.dataclass(frozen=True)
class Predictor:
    """A jitted eval step (params, rest, {"image"}) -> probabilities and the state it runs."""
    step: Callable
    params: Any
    rest: Any
    mesh: Any

    @classmethod
    def of(cls, model: Any, *, dtype: str = "float32", mesh: Any = None) -> "Predictor":
        """The model's eval step (BatchNorm on running statistics, no dropout) on `mesh`
        (default: every device); the model is put in eval mode."""
        import jax.numpy as jnp

        mesh = mesh or steps.data_mesh()
        _, eval_graph, params, rest = steps.split_model(model)
        model.eval()
        return cls(steps.make_eval_step(eval_graph, mesh, dtype=jnp.dtype(dtype)), params, rest,
                   mesh)

    def with_state(self, params: Any, rest: Any) -> "Predictor":
        """The same compiled step on other parameters (training's current state)."""
        return dataclasses.replace(self, params=params, rest=rest)

    def _probabilities(self, images: np.ndarray) -> np.ndarray:
        """This process's rows of the step's output for a process-local batch."""
        batch = distributed.to_global({"image": images}, self.mesh)
        return distributed.local_rows(self.step(self.params, self.rest, batch))

    def images(self, images: np.ndarray) -> np.ndarray:
        """Positive-class probability (float64) of each uint8 image (N, H, W, 3) this process
        holds, in one padded batch."""
        images = np.asarray(images)
        padded = np.zeros((padded_batch_size(len(images), self.mesh.size), *images.shape[1:]),
                          np.uint8)
        padded[:len(images)] = images
        return self._probabilities(padded)[:len(images)].astype(np.float64)

    def split(self, data_dir: str, split: str, *, batch_size: int,
              progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
        """Every slice of `split` once, in canonical order, gathered over processes:
        {"patient_id", "cohort" (str objects), "slice_index", "label", "probability" (float64)}.

        `batch_size` is the global batch, rounded up to a multiple of the devices; `progress`
        is called with the number of real slices of each batch.
        """
        from her2jax.data import pipeline as input_pipeline

        # a missing split is refused by eval_batches (MissingSplit)
        columns: dict[str, list] = {key: [] for key in (*SPLIT_COLUMNS, "valid")}
        for batch in input_pipeline.eval_batches(
                data_dir, split=split,
                global_batch_size=padded_batch_size(batch_size, self.mesh.size)):
            columns["probability"].append(self._probabilities(batch["image"]))
            for key in ("patient_id", "cohort"):
                columns[key].extend(batch[key])
            for key in ("slice_index", "label", "valid"):
                columns[key].append(batch[key])
            if progress is not None:
                progress(int(np.sum(batch["valid"])))
        # a patient's slices may sit in several processes' shares: gather all of them
        rows = distributed.allgather_rows({
            "patient_id": np.array(columns["patient_id"], dtype=object),
            "cohort": np.array(columns["cohort"], dtype=object),
            "slice_index": np.concatenate(columns["slice_index"]),
            "label": np.concatenate(columns["label"]),
            "probability": np.concatenate(columns["probability"]).astype(np.float64),
            "valid": np.concatenate(columns["valid"])})
        keep = rows.pop("valid").astype(bool)
        out = {key: value[keep] for key, value in rows.items()}
        for key in ("patient_id", "cohort"):
            out[key] = np.array([v.decode() if isinstance(v, bytes) else str(v)
                                 for v in out[key]], dtype=object)
        return out
