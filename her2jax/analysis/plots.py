"""Figures of an evaluation: ROC curves (with a bootstrap band and operating points) and
reliability diagrams. Matplotlib with the Agg backend; files are written through etils.epath."""
from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from her2jax import files
from her2jax.analysis import metrics

FPR_GRID = np.linspace(0.0, 1.0, 101)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, path: str | epath.Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(figure)
    target = epath.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    files.write_bytes(target, buffer.getvalue())


def tpr_at(labels: np.ndarray, scores: np.ndarray, grid: np.ndarray = FPR_GRID) -> np.ndarray:
    """The ROC curve's true-positive rate at each false-positive rate of `grid` (the highest
    TPR reached at that FPR, i.e. the upper edge of the step curve)."""
    fpr, tpr, _ = metrics.roc_curve(labels, scores)
    index = np.searchsorted(fpr, grid, side="right") - 1
    return tpr[np.clip(index, 0, len(tpr) - 1)]


def roc_band(labels: np.ndarray, scores: np.ndarray, *, samples: int = 1000,
             level: float = 0.95, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise percentile band of the TPR over `FPR_GRID`, resampling patients within each
    class as `metrics.bootstrap_auc_ci` does."""
    labels, scores = np.asarray(labels), np.asarray(scores, np.float64)
    positive, negative = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    rng = np.random.default_rng(seed)
    curves = []
    for _ in range(samples):
        chosen = np.concatenate([rng.choice(positive, positive.size),
                                 rng.choice(negative, negative.size)])
        curves.append(tpr_at(labels[chosen], scores[chosen]))
    alpha = 1.0 - level
    low, high = np.quantile(np.stack(curves), [alpha / 2, 1 - alpha / 2], axis=0)
    return low, high


def roc_figure(curves: Sequence[dict[str, Any]], path: str | epath.Path, title: str = "") -> None:
    """One plot with a ROC curve per entry: {"label", "labels", "scores", optional "band"
    (low, high) over FPR_GRID, optional "operating_point" (fpr, tpr) and "auc_text"}."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5.2, 5.0))
    axes.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1, label="chance")
    for index, curve in enumerate(curves):
        color = f"C{index}"
        fpr, tpr, _ = metrics.roc_curve(curve["labels"], curve["scores"])
        axes.step(fpr, tpr, where="post", color=color, linewidth=1.8,
                  label=f"{curve['label']} {curve.get('auc_text', '')}".strip())
        if curve.get("band") is not None:
            low, high = curve["band"]
            axes.fill_between(FPR_GRID, low, high, step="post", color=color, alpha=0.15,
                              linewidth=0)
        if curve.get("operating_point") is not None:
            x, y = curve["operating_point"]
            axes.plot([x], [y], marker="o", markersize=7, color=color, markeredgecolor="black")
    axes.set_xlim(-0.01, 1.01)
    axes.set_ylim(-0.01, 1.01)
    axes.set_xlabel("1 - specificity (false-positive rate)")
    axes.set_ylabel("sensitivity (true-positive rate)")
    axes.set_aspect("equal")
    axes.set_title(title, fontsize=10)
    axes.legend(loc="lower right", fontsize=8)
    axes.grid(alpha=0.3)
    _save(figure, path)


def calibration_figure(bins: dict[str, Any], probabilities: np.ndarray,
                       path: str | epath.Path, title: str = "") -> None:
    """Reliability diagram (fraction positive against mean predicted probability per bin, with
    the diagonal) above a histogram of the predicted probabilities."""
    plt = _pyplot()
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(5.0, 6.0), sharex=True,
                                         gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1, label="perfect")
    top.plot(bins["mean_predicted"], bins["fraction_positive"], marker="o", color="C0",
             label=f"model (ECE {bins['expected_calibration_error']:.3f}, "
                   f"Brier {bins['brier']:.3f})")
    top.set_ylabel("fraction HER2-positive")
    top.set_ylim(-0.02, 1.02)
    top.legend(loc="upper left", fontsize=8)
    top.grid(alpha=0.3)
    top.set_title(title, fontsize=10)
    bottom.hist(probabilities, bins=np.linspace(0, 1, 11), color="C0", alpha=0.7)
    bottom.set_xlabel("predicted probability of HER2-positive")
    bottom.set_ylabel("patients")
    bottom.set_xlim(0, 1)
    _save(figure, path)
