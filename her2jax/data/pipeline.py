"""Input pipeline: prepared TFRecords -> numpy batches on each host -> global jax.Arrays.

TensorFlow (tf.data on the host CPU) is used only here and in the modules of `her2jax.data` that
import `her2jax.data.tensorflow_host`.

Training stream of one process (`train_iterator`):
    epoch e = the process's share (see `her2jax.data.records`), its files in an order drawn from
    (seed, e), [balanced: rejection of examples, see `her2jax.data.sampling`], shuffled with a
    seed drawn from (seed, e); epochs follow one another without end;
    -> example t of the stream is decoded and augmented with the stateless seed (seed, t)
       (augment_on="device": decoded only, the seed pair sent along for the train step)
    -> batches of global_batch_size // process_count -> prefetch.
Everything random derives from (seed, process index, epoch, t), so `start_step=k` rebuilds the
stream from the epoch holding element k * local_batch and skips the records before it in that
epoch (no image decoded for them): the batches are exactly those of an uninterrupted run.

Evaluation (`eval_batches`) reads every example of the share once in canonical order, without
augmentation, and pads with `valid=False` examples up to the same number of full batches on
every process (processes run the same number of steps, as collective ops require).
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np

from her2jax.data import records, sampling
from her2jax.data.augment_host import apply
from her2jax.data.augment_options import DEFAULT_AUGMENT, Augment, check_augment_on
from her2jax.data.records import (MissingSplit, class_counts, open_dataset, preparation_metadata,
                                  require_split)
from her2jax.data.tensorflow_host import as_written, tf, tfds
from her2jax.distributed import to_global
from her2jax.errors import InvalidSetting

__all__ = ["DEFAULT_AUGMENT", "MissingSplit", "class_counts", "eval_batches", "open_dataset",
           "preparation_metadata", "read_examples", "require_split", "to_global",
           "train_iterator"]

MAX_FILES_READ_AT_ONCE = 16


def train_iterator(data_dir: str, *, split: str = "train", global_batch_size: int, seed: int,
                   augment: Mapping[str, Any] | None, balance: str = "none",
                   process_index: int | None = None, process_count: int | None = None,
                   start_step: int = 0, shuffle_buffer: int = 4096, augment_on: str = "host"
                   ) -> Iterator[dict[str, np.ndarray]]:
    """Endless shuffled training batches of this process: {"image": uint8 (b, H, W, 3),
    "label": int32 (b,)} with b = global_batch_size // process_count.

    augment: options of `her2jax.data.augment.Augment.from_mapping` (None or {}: none).
    balance: "none", "class" (labels equally often) or "patient" (every patient equally often,
        whatever its slice count); both by rejection sampling, see `her2jax.data.sampling`.
    process_index, process_count: default to jax's, read at call time (after
        `jax.distributed.initialize`).
    start_step: the first batch is the one an uninterrupted iterator yields at this step.
    shuffle_buffer: records (still encoded) in the shuffle buffer of each epoch.
    augment_on: "host" augments here; "device" leaves the images as read and adds
        "augment_seed": uint32 (b, 2), each example's seed pair, for the train step to augment
        with (`her2jax.data.augment.augment_batch`, `steps.make_train_step(augment=...)`).
    """
    process_index, process_count = _processes(process_index, process_count)
    local_batch = _local_batch_size(global_batch_size, process_count)
    options = Augment.from_mapping(augment)
    check_augment_on(augment_on)
    sampling.check_balance(balance)
    builder = open_dataset(data_dir)
    pieces = records.split_share(builder, split, process_index, process_count)
    share_size = sum(piece.take for piece in pieces)
    probabilities = _keep_probabilities(builder, split, balance, process_index, process_count)
    seeds = {purpose: sampling.derived_seed(seed, process_index, purpose)
             for purpose in (sampling.SHUFFLE, sampling.ACCEPT, sampling.AUGMENT)}
    start = start_step * local_batch
    epoch, skip = sampling.resume_position(start, share_size, probabilities,
                                           seeds[sampling.ACCEPT])

    @as_written
    def epoch_records(epoch: tf.Tensor) -> tf.data.Dataset:
        dataset = _shuffled_pieces(pieces, seeds[sampling.SHUFFLE], epoch)
        if probabilities is not None:
            keep = sampling.kept(tf.constant(probabilities), seeds[sampling.ACCEPT], epoch)
            dataset = dataset.filter(as_written(lambda position, record: keep[position]))
        return dataset.shuffle(shuffle_buffer,
                               seed=sampling.epoch_shuffle_seed(seeds[sampling.SHUFFLE], epoch))

    features = builder.info.features

    @as_written
    def example(index: tf.Tensor, position_and_record: tuple[tf.Tensor, tf.Tensor]
                ) -> dict[str, tf.Tensor]:
        parsed = records.parse(features, position_and_record[1])
        seed_pair = tf.stack([tf.constant(seeds[sampling.AUGMENT], tf.int64), index])
        if augment_on == "device":   # the seed as two uint32 (the index modulo 2^32)
            return {"image": parsed["image"], "label": parsed["label"],
                    "augment_seed": tf.cast(tf.bitwise.bitwise_and(seed_pair, 0xFFFFFFFF),
                                            tf.uint32)}
        return {"image": apply(options, parsed["image"], seed_pair), "label": parsed["label"]}

    dataset = (tf.data.Dataset.counter(epoch).flat_map(epoch_records)
               .skip(skip)
               .enumerate(start)
               .map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
               .batch(local_batch, drop_remainder=True)
               .prefetch(tf.data.AUTOTUNE))
    return _numpy_batches(dataset)


def eval_batches(data_dir: str, *, split: str, global_batch_size: int,
                 process_index: int | None = None, process_count: int | None = None
                 ) -> Iterator[dict[str, np.ndarray]]:
    """Every example of this process's share exactly once, in canonical order, unaugmented:
    {"image", "label", "valid": bool, "patient_id" and "cohort": bytes objects, "slice_index":
    int32}, local batches of global_batch_size // process_count. The tail is padded (valid False,
    image zeros, label 0, patient_id and cohort b"", slice_index -1) up to the same number of
    batches on every process.
    """
    process_index, process_count = _processes(process_index, process_count)
    local_batch = _local_batch_size(global_batch_size, process_count)
    builder = open_dataset(data_dir)
    pieces = records.split_share(builder, split, process_index, process_count)
    share_size = sum(piece.take for piece in pieces)
    largest_share = -(-builder.info.splits[split].num_examples // process_count)
    batches = math.ceil(largest_share / local_batch)
    features = builder.info.features

    @as_written
    def example(position: tf.Tensor, record: tf.Tensor) -> dict[str, tf.Tensor]:
        return dict(records.parse(features, record), valid=tf.constant(True))

    padding = _padding(features["image"].shape)
    dataset = (records.read_pieces(pieces)
               .map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
               .concatenate(tf.data.Dataset.from_tensors(padding)
                            .repeat(batches * local_batch - share_size))
               .batch(local_batch)
               .prefetch(tf.data.AUTOTUNE))
    return _numpy_batches(dataset)


def read_examples(data_dir: str, split: str, patient_ids: set[str] | None = None
                  ) -> dict[str, np.ndarray]:
    """Every example of `split` (or of the patients in `patient_ids`) in canonical order, with
    the tumour mask: {"image" uint8 (n, H, W, 3), "mask" uint8 (n, H, W), "label",
    "patient_id" and "cohort" (str objects), "slice_index"}. For looking at a few patients
    (explanations), not for streaming a split."""
    builder = require_split(data_dir, split)
    columns: dict[str, list] = {k: [] for k in ("image", "mask", "label", "patient_id",
                                                "cohort", "slice_index")}
    for example in builder.as_dataset(split=split, shuffle_files=False).as_numpy_iterator():
        patient = example["patient_id"].decode()
        if patient_ids is not None and patient not in patient_ids:
            continue
        columns["image"].append(example["image"])
        columns["mask"].append(example["mask"][..., 0])
        columns["label"].append(int(example["label"]))
        columns["patient_id"].append(patient)
        columns["cohort"].append(example["cohort"].decode())
        columns["slice_index"].append(int(example["slice_index"]))
    size = builder.info.features["image"].shape
    return {"image": np.stack(columns["image"]) if columns["image"]
            else np.zeros((0, *size), np.uint8),
            "mask": np.stack(columns["mask"]) if columns["mask"]
            else np.zeros((0, *size[:2]), np.uint8),
            "label": np.array(columns["label"], np.int64),
            "patient_id": np.array(columns["patient_id"], dtype=object),
            "cohort": np.array(columns["cohort"], dtype=object),
            "slice_index": np.array(columns["slice_index"], np.int64)}


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    process_count = jax.process_count() if process_count is None else process_count
    process_index = jax.process_index() if process_index is None else process_index
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside 0..{process_count - 1}")
    return process_index, process_count


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise InvalidSetting(f"global_batch_size {global_batch_size} must be a positive multiple "
                             f"of the process count {process_count}")
    return global_batch_size // process_count


def _keep_probabilities(builder: tfds.core.DatasetBuilder, split: str, balance: str,
                        process_index: int, process_count: int) -> np.ndarray | None:
    """This process's slice of the keep probabilities (weights need the whole split's counts)."""
    if balance == "none":
        return None
    index = records.read_index(builder, split)
    probabilities = sampling.keep_probabilities(balance, index["label"], index["patient_id"])
    start, end = sampling.process_range(len(probabilities), process_index, process_count)
    return probabilities[start:end]


def _shuffled_pieces(pieces: list[records.Piece], seed: int, epoch: tf.Tensor
                     ) -> tf.data.Dataset:
    """(position, record) of the pieces, read a few files at a time in an order drawn from
    (seed, epoch)."""
    order = tf.random.experimental.stateless_shuffle(
        tf.range(len(pieces), dtype=tf.int64),
        seed=tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)]))
    shuffled = tf.data.Dataset.from_tensor_slices(
        tuple(tf.gather(column, order) for column in records.piece_columns(pieces)))
    return shuffled.interleave(records.read_piece,
                               cycle_length=min(len(pieces), MAX_FILES_READ_AT_ONCE),
                               num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _padding(image_shape: tuple[int, ...]) -> dict[str, tf.Tensor]:
    return {"image": tf.zeros(image_shape, tf.uint8), "label": tf.constant(0, tf.int32),
            "patient_id": tf.constant(b""), "cohort": tf.constant(b""),
            "slice_index": tf.constant(-1, tf.int32),
            "valid": tf.constant(False)}


def _numpy_batches(dataset: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
    options = tf.data.Options()
    options.deterministic = True
    yield from dataset.with_options(options).as_numpy_iterator()
