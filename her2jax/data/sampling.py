"""Seeds, class or patient balancing, and where a resumed stream starts.

Balancing is rejection sampling by epoch: example i of the canonical order has weight w_i (class:
1 / examples of its label; patient: 1 / slices of its patient, counted over the whole split) and
is kept in epoch e when u(e, i) < p_i = w_i / max(w), with u(e, .) one stateless uniform vector
drawn from (seed, e). Kept examples are therefore drawn in proportion to w: every class, or every
patient, contributes equally in expectation. The examples with the largest weight (the rarest
class, the patients with the fewest slices) are kept in every epoch, the others in a fresh random
subset each epoch, so a balanced epoch is shorter than the share. The acceptance depends on
(seed, epoch, position) only, so the length of every epoch is known without reading images,
which is what makes an exact resume cheap.
"""
from __future__ import annotations

import collections
import functools
from typing import Any

import numpy as np

from her2jax.errors import BadInput, InvalidSetting

BALANCE_MODES = ("none", "class", "patient")
# purposes of the seeds derived from the user's seed
SHUFFLE, ACCEPT, AUGMENT = 0, 1, 2
EPOCH_BLOCK = 1024  # epochs whose lengths a resume counts per call


def process_range(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
    """[start, end) of process `process_index`'s share of `num_examples` in canonical order."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside 0..{process_count - 1}")
    return (process_index * num_examples // process_count,
            (process_index + 1) * num_examples // process_count)


def derived_seed(seed: int, process_index: int, purpose: int) -> int:
    """A 32-bit seed for one purpose on one process, mixed from the user's seed."""
    return int(np.random.SeedSequence([seed, process_index, purpose]).generate_state(1)[0])


def check_balance(balance: str) -> None:
    """Raises ValueError unless `balance` is one of BALANCE_MODES."""
    if balance not in BALANCE_MODES:
        raise InvalidSetting(f"balance {balance!r}: one of {BALANCE_MODES}")


def keep_probabilities(balance: str, labels: np.ndarray,
                       patient_ids: np.ndarray) -> np.ndarray | None:
    """p_i = w_i / max(w) per example of the canonical order (see the module docstring); None for
    `balance="none"` (every example kept)."""
    check_balance(balance)
    if balance == "none":
        return None
    groups = labels if balance == "class" else patient_ids
    sizes = collections.Counter(groups.tolist())
    smallest = min(sizes.values())
    return np.array([smallest / sizes[group] for group in groups.tolist()], np.float64)


def sampled_class_mass(balance: str, labels: np.ndarray, patient_ids: np.ndarray,
                       num_classes: int) -> np.ndarray:
    """Expected examples of each class that one pass over the split keeps under `balance`:
    sum_i p_i over the examples of the class (float64, (num_classes,)). Class weights computed
    from it balance what the loss actually sees: ones under class balancing (the sampler already
    balances; weighing again would count the rarer class twice), patient-level prevalence
    under patient balancing, the slice counts without balancing."""
    probabilities = keep_probabilities(balance, labels, patient_ids)
    return np.bincount(np.asarray(labels, np.int64), weights=probabilities,
                       minlength=num_classes).astype(np.float64)


def _tf() -> Any:
    """TensorFlow, imported when the TFRecord stream needs it: the rest of this module (seeds,
    weights, shares) serves the device-resident source too, where TensorFlow may be absent."""
    from her2jax.data.tensorflow_host import tf

    return tf


def kept(probabilities: Any, seed: Any, epoch: Any) -> Any:
    """Which examples epoch `epoch` keeps: bool (n,), u(e, i) < p_i. The same op eagerly (to count
    an epoch's length) and inside tf.data (to filter), so both agree exactly."""
    tf = _tf()
    uniform = tf.random.stateless_uniform(
        tf.shape(probabilities), seed=tf.stack([tf.cast(seed, tf.int64), tf.cast(epoch, tf.int64)]),
        dtype=tf.float64)
    return uniform < probabilities


def epoch_shuffle_seed(seed: int, epoch: Any) -> Any:
    """The shuffle seed of one epoch, an int64 drawn from (seed, epoch)."""
    tf = _tf()
    return tf.random.stateless_uniform(
        [], seed=tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)]),
        minval=None, maxval=None, dtype=tf.int64)


def resume_position(start_element: int, share_size: int, probabilities: np.ndarray | None,
                    accept_seed: int) -> tuple[int, int]:
    """(epoch, examples of that epoch to skip) at which element `start_element` of the stream is.

    Without balancing every epoch has `share_size` examples; with it, epoch e has
    sum_i [u(e, i) < p_i] examples, counted for blocks of epochs at a time (no image is read).
    """
    if share_size == 0:
        raise BadInput("this process's share of the split is empty")
    if probabilities is None:
        return divmod(start_element, share_size)
    tf = _tf()
    probabilities = tf.constant(probabilities, tf.float64)
    first, remaining = 0, start_element
    while True:
        lengths = _epoch_lengths()(probabilities, tf.constant(accept_seed, tf.int64),
                                   tf.range(first, first + EPOCH_BLOCK, dtype=tf.int64)).numpy()
        ends = np.cumsum(lengths)
        if remaining < ends[-1]:
            epoch = int(np.searchsorted(ends, remaining, side="right"))
            return first + epoch, remaining - int(ends[epoch] - lengths[epoch])
        first, remaining = first + EPOCH_BLOCK, remaining - int(ends[-1])


@functools.cache
def _epoch_lengths() -> Any:
    """(probabilities, seed, epochs) -> each epoch's length, one compiled tf.function."""
    tf = _tf()

    @tf.function
    def lengths(probabilities, seed, epochs):
        return tf.map_fn(lambda epoch: tf.reduce_sum(tf.cast(kept(probabilities, seed, epoch),
                                                             tf.int64)),
                         epochs, fn_output_signature=tf.int64)

    return lengths
