"""Classification loss: cross-entropy with label smoothing and class weights."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def class_weights_from_counts(counts: np.ndarray) -> np.ndarray:
    """w_c = N / (C n_c): every class contributes equally to the loss ('balanced' weighting)."""
    counts = np.asarray(counts, np.float64)
    if (counts <= 0).any():
        raise ValueError(f"every class needs training examples to weigh it; counts {counts}")
    return (counts.sum() / (len(counts) * counts)).astype(np.float32)


def cross_entropy(logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0,
                  class_weights: jax.Array | None = None,
                  valid: jax.Array | None = None) -> jax.Array:
    """Weighted mean over examples of -sum_c q_c log softmax(z)_c, with
    q = (1 - s) onehot(y) + s / C, weights w_{y_i} (1 without class weights) times `valid`:

        loss = sum_i w_{y_i} l_i / sum_i w_{y_i}

    which is torch.nn.functional.cross_entropy(weight=w, label_smoothing=s). Computed in float32.
    """
    logits = logits.astype(jnp.float32)
    num_classes = logits.shape[-1]
    targets = jax.nn.one_hot(labels, num_classes) * (1.0 - label_smoothing) + \
        label_smoothing / num_classes
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    if class_weights is None:
        per_example = -jnp.sum(targets * log_probs, axis=-1)
        weights = jnp.ones_like(per_example)
    else:
        # torch weighs each class's term inside the smoothed sum by w_c, and normalises by w_y
        per_example = -jnp.sum(targets * log_probs * class_weights, axis=-1)
        weights = class_weights[labels]
    if valid is not None:
        weights = weights * valid.astype(jnp.float32)
        per_example = per_example * valid.astype(jnp.float32)
    return jnp.sum(per_example) / jnp.maximum(jnp.sum(weights), 1e-12)
