"""Explanation of a run over patients (the library behind `python -m her2jax.explain`): the heat
maps of `her2jax.analysis.maps` for chosen patients' slices, their overlays and how much of
each map falls inside the tumour.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from her2jax import files
from her2jax.analysis import evaluation
from her2jax.analysis import maps as explain_maps
from her2jax.errors import InvalidSetting
from her2jax.models.resnet import ResNet
from her2jax.models.vit import VisionTransformer


def heat_maps(model: Any, images: np.ndarray) -> dict[str, np.ndarray]:
    """{name: float (N, H, W)} of every explanation that applies to `model`."""
    if isinstance(model, ResNet):
        maps = {"Grad-CAM": explain_maps.grad_cam(model, images)}
        layer = finer_layer(images.shape[1])
        if model.head == "single" and layer is not None:
            maps[f"Grad-CAM layer{layer}"] = explain_maps.grad_cam(model, images, layer=layer)
        if model.head != "single":
            for head in range(len(model.heads)):
                maps[f"Grad-CAM head {head} (layer{head + 2})"] = explain_maps.grad_cam(
                    model, images, head=head)
        for name, gate in explain_maps.spatial_attention_maps(model, images).items():
            maps[f"gate {name}"] = gate
        return maps
    if isinstance(model, VisionTransformer):
        return {"attention rollout": explain_maps.attention_rollout(model, images)}
    raise InvalidSetting(f"no explanation for {type(model).__name__}")


def finer_layer(image_size: int) -> int | None:
    """When layer4's map is under 4 x 4 cells (images under 128 px; strides 4, 8, 16, 32), the
    deepest layer whose map has at least 4 x 4 cells, else None."""
    if image_size // 32 >= 4:
        return None
    for layer, stride in ((3, 16), (2, 8), (1, 4)):
        if image_size // stride >= 4:
            return layer
    return None


def write_overlays(model: Any, images: np.ndarray, masks: np.ndarray, folder: Any,
                   names: Sequence[str], titles: Sequence[str]) -> list[dict[str, Any]]:
    """One PNG per image (slice, then each heat map over it) named `names[i].png` in `folder`;
    returns per image its file and, per map, inside_fraction and concentration_ratio."""
    folder = epath.Path(folder)
    maps = heat_maps(model, images)
    entries = []
    for i, (name, title) in enumerate(zip(names, titles)):
        image, mask = images[i], masks[i] > 0
        panels = [(title, explain_maps.overlay(image, np.zeros(mask.shape), mask, alpha=0.0))]
        summary = {}
        for map_name, values in maps.items():
            panels.append((map_name, explain_maps.overlay(image, values[i], mask)))
            summary[map_name] = {
                "inside_fraction": explain_maps.inside_fraction(values[i], mask),
                "concentration_ratio": explain_maps.concentration_ratio(values[i], mask),
                "mask_fraction": float(mask.mean())}
        path = folder / f"{name}.png"
        explain_maps.save_overlay_png(path, panels)
        entries.append({"file": path.name, "maps": summary})
    return entries


def choose_patients(patient_ids: np.ndarray, labels: np.ndarray, count: int) -> list[str]:
    """`count` patients, positive and negative alternately (positives first), in id order."""
    label_of = dict(zip(patient_ids, labels))
    positive = sorted(p for p, y in label_of.items() if y == 1)
    negative = sorted(p for p, y in label_of.items() if y == 0)
    chosen = []
    while len(chosen) < count and (positive or negative):
        for group in (positive, negative):
            if group and len(chosen) < count:
                chosen.append(group.pop(0))
    return chosen


def explain_run(workdir: str, *, split: str = "test", patients: int = 4,
                patient_ids: Sequence[str] | None = None, checkpoint: str = "best",
                data_dir: str | None = None, out: str | None = None) -> dict[str, Any]:
    from her2jax.data import pipeline as input_pipeline
    from her2jax.run_folder import RunFolder
    from her2jax.training import inference

    restored = RunFolder(workdir).restore(checkpoint)
    data_dir = data_dir or restored.config.data_dir
    evaluation.check_preparation(restored.preparation,
                                 input_pipeline.preparation_metadata(data_dir)["preparation"],
                                 data_dir)
    examples = input_pipeline.read_examples(data_dir, split)
    if patient_ids:
        missing = sorted(set(patient_ids) - set(examples["patient_id"]))
        if missing:
            raise InvalidSetting(f"not in {split}: {missing}")
        chosen = list(patient_ids)
    else:
        chosen = choose_patients(examples["patient_id"], examples["label"], patients)
    keep = np.isin(examples["patient_id"], chosen)
    examples = {k: v[keep] for k, v in examples.items()}
    probabilities = inference.Predictor.of(restored.model,
                                           dtype=restored.config.dtype).images(examples["image"])
    folder = epath.Path(out) if out else RunFolder(workdir).eval_dir(split) / "explain"
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"{p}_slice{z:03d}" for p, z in zip(examples["patient_id"],
                                                 examples["slice_index"])]
    titles = [f"{p} {'HER2+' if y else 'HER2-'} z={z} p={q:.2f}"
              for p, y, z, q in zip(examples["patient_id"], examples["label"],
                                    examples["slice_index"], probabilities)]
    entries = write_overlays(restored.model, examples["image"], examples["mask"], folder,
                             names, titles)
    for entry, patient, label, z, probability in zip(
            entries, examples["patient_id"], examples["label"], examples["slice_index"],
            probabilities):
        entry.update(patient_id=patient, label=int(label), slice_index=int(z),
                     probability=float(probability))
    summary = {"run": str(workdir), "checkpoint": restored.checkpoint, "step": restored.step,
               "split": split, "patients": chosen, "slices": entries,
               "patients_asked": patients if patient_ids is None else list(patient_ids),
               "mean_concentration_ratio": _mean_ratio(entries)}
    files.write_json(folder / "explain.json", summary, indent=2)
    summary["folder"] = str(folder)
    return summary


def _mean_ratio(entries: list[dict[str, Any]]) -> dict[str, float]:
    """Per map, the mean concentration ratio over slices where it is defined."""
    out: dict[str, list[float]] = {}
    for entry in entries:
        for name, values in entry["maps"].items():
            if math.isfinite(values["concentration_ratio"]):
                out.setdefault(name, []).append(values["concentration_ratio"])
    return {name: float(np.mean(values)) for name, values in out.items()}
