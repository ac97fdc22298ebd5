"""The prepared TFRecords: opening a dataset, its metadata, each process's share, parsing.

The canonical order of a split is its TFRecord files in TFDS's order, records in file order.
Process i of P owns the contiguous range [i * N // P, (i + 1) * N // P) of that order (shares differ
by at most one example, like `tfds.even_splits`), read as pieces: runs of records of the files that
overlap the range. A process therefore reads only its own files, or only its part of a file when
there are fewer files than processes, and no example is in two shares.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
from etils import epath

from her2jax.data.sampling import process_range, sampled_class_mass
from her2jax.data.tensorflow_host import as_written, tf, tfds
from her2jax.errors import InvalidSetting

INDEX_BATCH = 1024


@dataclasses.dataclass(frozen=True)
class Piece:
    """`take` records of the TFRecord file `path` after its first `skip`; `offset` is the position
    of the first of them in the process's share."""
    path: str
    skip: int
    take: int
    offset: int


def open_dataset(data_dir: str) -> tfds.core.DatasetBuilder:
    """The prepared dataset at `data_dir`, a `her2_dce/<config>/<version>` folder (local, gs://)."""
    return tfds.builder_from_directory(str(data_dir))


class MissingSplit(InvalidSetting):
    """A split asked for is not in the prepared dataset."""


def require_split(data: str | tfds.core.DatasetBuilder, split: str,
                  what: str = "") -> tfds.core.DatasetBuilder:
    """The dataset (a folder or an opened builder), if it has `split`; else MissingSplit naming
    the folder, the split (as `what`, e.g. "config.eval_split 'test'") and the splits it has."""
    builder = open_dataset(data) if isinstance(data, (str, epath.Path)) else data
    if split not in builder.info.splits:
        raise MissingSplit(f"{what or 'split'} {split!r}: {builder.data_dir} has no such split "
                           f"(splits: {', '.join(sorted(builder.info.splits))})")
    return builder


def preparation_metadata(data_dir: str) -> dict[str, Any]:
    """The dataset's `metadata.json`: `preparation`, `patients`, `counts`, `files`, ..."""
    return json.loads((epath.Path(data_dir) / "metadata.json").read_text(encoding="utf-8"))


def share(paths: list[str], lengths: list[int], process_index: int,
          process_count: int) -> list[Piece]:
    """The pieces of files (`lengths` records each) that make up one process's share."""
    start, end = process_range(sum(lengths), process_index, process_count)
    pieces, file_start = [], 0
    for path, length in zip(paths, lengths):
        first, last = max(start, file_start), min(end, file_start + length)
        if first < last:
            pieces.append(Piece(path, first - file_start, last - first, first - start))
        file_start += length
    return pieces


def split_share(builder: tfds.core.DatasetBuilder, split: str, process_index: int,
                process_count: int) -> list[Piece]:
    """`share` of a split of the prepared dataset."""
    info = require_split(builder, split).info.splits[split]
    return share([str(path) for path in info.filepaths], list(info.shard_lengths),
                 process_index, process_count)


def piece_columns(pieces: list[Piece]) -> tuple[tf.Tensor, ...]:
    """(paths, skips, takes, offsets) of the pieces, the arguments of `read_piece` as columns."""
    return (tf.constant([p.path for p in pieces], tf.string),
            tf.constant([p.skip for p in pieces], tf.int64),
            tf.constant([p.take for p in pieces], tf.int64),
            tf.constant([p.offset for p in pieces], tf.int64))


@as_written
def read_piece(path: tf.Tensor, skip: tf.Tensor, take: tf.Tensor, offset: tf.Tensor
               ) -> tf.data.Dataset:
    """(position in the share, serialized record) for each record of one piece."""
    return tf.data.TFRecordDataset(path).skip(skip).take(take).enumerate(offset)


def read_pieces(pieces: list[Piece]) -> tf.data.Dataset:
    """(position, serialized record) of every record of `pieces`, in order."""
    return tf.data.Dataset.from_tensor_slices(piece_columns(pieces)).flat_map(read_piece)


def parse(features: tfds.features.FeaturesDict, record: tf.Tensor) -> dict[str, tf.Tensor]:
    """A serialized example as image (uint8 H x W x 3), label (int32), patient_id, cohort and
    slice_index; the mask is neither decoded nor kept."""
    skip = tfds.decode.SkipDecoding()
    example = features.deserialize_example(record, decoders={"image": skip, "mask": skip})
    return {"image": features["image"].decode_example(example["image"]),
            "label": tf.cast(example["label"], tf.int32),
            "patient_id": example["patient_id"],
            "cohort": example["cohort"],
            "slice_index": tf.cast(example["slice_index"], tf.int32)}


def read_index(builder: tfds.core.DatasetBuilder, split: str) -> dict[str, np.ndarray]:
    """Label and patient id of every example of a split in canonical order (one pass over the
    records, images not decoded)."""
    features = builder.info.features
    skip = tfds.decode.SkipDecoding()

    @as_written
    def labels_and_ids(position: tf.Tensor, record: tf.Tensor) -> dict[str, tf.Tensor]:
        example = features.deserialize_example(record, decoders={"image": skip, "mask": skip})
        return {"label": tf.cast(example["label"], tf.int32), "patient_id": example["patient_id"]}

    dataset = (read_pieces(split_share(builder, split, 0, 1))
               .map(labels_and_ids, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
               .batch(INDEX_BATCH))
    parts = list(dataset.as_numpy_iterator())
    if not parts:
        return {"label": np.zeros(0, np.int32), "patient_id": np.zeros(0, object)}
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def sampled_class_counts(data_dir: str, split: str, balance: str) -> np.ndarray:
    """What each class weighs in one pass of the training stream under `balance`
    (`sampling.sampled_class_mass`); the plain counts without balancing."""
    if balance == "none":
        return class_counts(data_dir, split).astype(np.float64)
    builder = open_dataset(data_dir)
    index = read_index(builder, split)
    return sampled_class_mass(balance, index["label"], index["patient_id"],
                                       len(builder.info.features["label"].names))


def class_counts(data_dir: str, split: str = "train") -> np.ndarray:
    """Examples (slices) per label of a split, int64 (num_classes,): from the metadata's `counts`
    when it has them, else from one pass over the split's labels."""
    builder = open_dataset(data_dir)
    names = list(builder.info.features["label"].names)
    counts = np.zeros(len(names), np.int64)
    rows = [row for row in builder.info.metadata.get("counts", [])
            if row[0] == split and row[3] == "slices"]
    for _, label, _, _, count in rows:
        counts[names.index(label)] += count
    if not rows:
        counts += np.bincount(read_index(builder, split)["label"], minlength=len(names))
    return counts
