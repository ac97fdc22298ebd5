"""The dataset resident on the accelerator: `config.input.source = "device"`.

The training and evaluation splits are read once through the TFRecord reader (on the host, with
TensorFlow), kept as uint8 on the devices, and every training batch is then drawn on the device
from the run's seed and the step: the step loop touches neither TensorFlow nor the host's cores.
TensorFlow is imported only to read the splits (`read_split`, `split_bytes`): the streams
themselves run where it is absent. The train step augments the drawn images
(`her2jax.data.augment.augment_batch`), so this source goes with
`config.input.augment_on = "device"`.

Layout. The training split is replicated on every device when it (with the evaluation split)
takes at most REPLICATE_FRACTION of one device's free memory; otherwise it is sharded over the
'data' axis, each device holding a contiguous share; if even a share would take more than
SHARD_FRACTION, the run is refused before training with the bytes needed and the bytes free.

Draws. Stream position t (example t of the run's stream, t = step * batch + row):
- balance "none": epochs without replacement, example order(e)[t mod n] with e = t div n and
  order(e) a permutation of the share drawn from (seed, e);
- balance "class" / "patient": example i with probability w_i / sum(w) (the weights of
  `her2jax.data.sampling`, counted over the whole split), one independent draw per position
  (with replacement; the TFRecord source balances by rejection within epochs, so the two sources
  give other streams with the same expected class or patient frequencies);
- augmentation: the seed pair (augment seed, t), as the TFRecord source sends it.
Replicated, t counts over the global batch, so the stream does not depend on the number of
devices. Sharded, each device draws its rows from its own share with its own seeds (like the
processes of the TFRecord source), t counting that device's rows.
Everything is a function of (seed, step), so a resumed run draws exactly the batches an
uninterrupted one would.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from her2jax.data import sampling
from her2jax.errors import InvalidSetting

SOURCES = ("tfrecord", "device")
REPLICATE_FRACTION = 0.25
SHARD_FRACTION = 0.5
READ_BATCH = 512


class DoesNotFit(InvalidSetting):
    """The splits would not fit in the devices' free memory."""


def check_source(source: str, augment_on: str) -> None:
    if source not in SOURCES:
        raise InvalidSetting(f"config.input.source {source!r} is not one of: {', '.join(SOURCES)}")
    if source == "device" and augment_on != "device":
        raise InvalidSetting("config.input.source='device' augments in the train step: set "
                             "config.input.augment_on='device' as well")


def read_split(data_dir: str, split: str) -> dict[str, np.ndarray]:
    """Every example of `split` in canonical order: {"image" uint8 (n, H, W, 3), "label" int32,
    "patient_id" and "cohort" (str objects), "slice_index" int32}. Reads with TensorFlow."""
    from her2jax.data import records
    from her2jax.data.tensorflow_host import as_written, tf

    builder = records.require_split(data_dir, split)
    features = builder.info.features

    @as_written
    def example(position, record):
        return records.parse(features, record)

    dataset = (records.read_pieces(records.split_share(builder, split, 0, 1))
               .map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
               .batch(READ_BATCH))
    parts = list(dataset.as_numpy_iterator())
    shape = tuple(features["image"].shape)
    if not parts:
        return {"image": np.zeros((0, *shape), np.uint8), "label": np.zeros(0, np.int32),
                "patient_id": np.zeros(0, object), "cohort": np.zeros(0, object),
                "slice_index": np.zeros(0, np.int32)}
    out = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    for key in ("patient_id", "cohort"):
        out[key] = np.array([value.decode() for value in out[key]], dtype=object)
    return out


def free_bytes(device: Any) -> int:
    """Free memory of one device: its allocator's limit minus what is in use; on a CPU, where
    every device shares the host's memory, the available host memory over the local devices."""
    stats = device.memory_stats()        # None on a CPU
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return available // max(1, jax.local_device_count())


def choose_layout(train_bytes: int, eval_bytes: int, devices: int, free: int) -> str:
    """"replicated" or "sharded" (see the module docstring); DoesNotFit when neither fits."""
    if train_bytes + -(-eval_bytes // devices) <= REPLICATE_FRACTION * free:
        return "replicated"
    per_device = -(-train_bytes // devices) + -(-eval_bytes // devices)
    if per_device <= SHARD_FRACTION * free:
        return "sharded"
    where = f"on each device even sharded over {devices}" if devices > 1 else "on the device"
    raise DoesNotFit(
        f"config.input.source='device': the splits need {_size(per_device)} {where} (train "
        f"{_size(train_bytes)}, evaluation {_size(eval_bytes)} in all), {_size(free)} free on "
        f"{jax.local_devices()[0]}, of which at most {SHARD_FRACTION:.0%} may hold data; use "
        "input.source='tfrecord'")


def _size(nbytes: int) -> str:
    return f"{nbytes} bytes ({nbytes / 2**30:.2f} GiB)"


def split_bytes(data_dir: str, split: str) -> int:
    """uint8 images plus int32 labels of a split, from the dataset's metadata (nothing read)."""
    from her2jax.data import records

    builder = records.require_split(data_dir, split)
    shape = builder.info.features["image"].shape
    return builder.info.splits[split].num_examples * (int(np.prod(shape)) + 4)


def _put(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array every process holds whole."""
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


@dataclasses.dataclass
class TrainStream:
    """Training batches drawn on the device: `batch(index)` is the batch of step index + 1,
    {"image": uint8 (B, H, W, 3), "label": int32 (B,), "augment_seed": uint32 (B, 2)}, sharded
    over 'data'."""
    draw: Any
    arrays: tuple

    def batch(self, index: int) -> dict[str, jax.Array]:
        return self.draw(*self.arrays, jnp.asarray(index, jnp.uint32))


def train_stream(host: dict[str, np.ndarray], mesh: Mesh, *, global_batch_size: int, seed: int,
                 balance: str, layout: str) -> TrainStream:
    """The split `host` (`read_split`) on the devices of `mesh`, and its draw (module docstring)."""
    sampling.check_balance(balance)
    n = len(host["label"])
    if n == 0:
        raise InvalidSetting("the training split is empty")
    devices = mesh.size
    if global_batch_size % devices:
        raise InvalidSetting(f"batch_size {global_batch_size} does not split over {devices} "
                             "devices")
    local_batch = global_batch_size // devices
    shares = devices if layout == "sharded" else 1
    ranges = [sampling.process_range(n, d, shares) for d in range(shares)]
    rows = max(end - start for start, end in ranges)       # every share padded to this
    image = np.zeros((shares, rows, *host["image"].shape[1:]), np.uint8)
    label = np.zeros((shares, rows), np.int32)
    weight = np.zeros((shares, rows), np.float64)
    probabilities = sampling.keep_probabilities(balance, host["label"], host["patient_id"])
    for d, (start, end) in enumerate(ranges):
        image[d, :end - start] = host["image"][start:end]
        label[d, :end - start] = host["label"][start:end]
        weight[d, :end - start] = 1.0 if probabilities is None else probabilities[start:end]
    sizes = np.array([end - start for start, end in ranges], np.int32)
    cumulative = np.cumsum(weight, axis=1)
    cumulative = (cumulative / cumulative[:, -1:]).astype(np.float32)
    seeds = np.array([[sampling.derived_seed(seed, d, purpose)
                       for purpose in (sampling.SHUFFLE, sampling.ACCEPT, sampling.AUGMENT)]
                      for d in range(shares)], np.uint32)
    spec = PartitionSpec("data") if layout == "sharded" else PartitionSpec()
    arrays = tuple(_put(a, NamedSharding(mesh, spec))
                   for a in (image, label, cumulative, sizes, seeds))
    # the epochs one device's rows of a batch can touch
    epochs = -(-local_batch // int(sizes.min())) + 1
    balanced = probabilities is not None

    def draw_rows(image, label, cumulative, size, seed, index):
        """One device's rows: (share, rows, ...) blocks of one share each."""
        image, label, cumulative, size, seed = image[0], label[0], cumulative[0], size[0], seed[0]
        rows_of_this_device = jnp.arange(local_batch, dtype=jnp.uint32)
        if layout == "sharded":
            positions = index * local_batch + rows_of_this_device
        else:
            device = jax.lax.axis_index("data").astype(jnp.uint32)
            positions = index * global_batch_size + device * local_batch + rows_of_this_device
        if balanced:
            keys = jax.vmap(lambda t: jax.random.fold_in(_key(seed[1]), t))(positions)
            u = jax.vmap(lambda k: jax.random.uniform(k, dtype=jnp.float32))(keys)
            chosen = jnp.minimum(jnp.searchsorted(cumulative, u, side="right"), size - 1)
        else:
            epoch = positions // size.astype(jnp.uint32)
            first = jnp.min(epoch)
            orders = jax.vmap(lambda e: _order(_key(seed[0]), e, size, rows))(
                first + jnp.arange(epochs, dtype=jnp.uint32))
            chosen = orders[epoch - first, positions % size.astype(jnp.uint32)]
        augment_seed = jnp.stack([jnp.full_like(positions, seed[2]), positions], axis=1)
        return {"image": image[chosen], "label": label[chosen],
                "augment_seed": augment_seed.astype(jnp.uint32)}

    data = PartitionSpec("data")
    mapped = jax.shard_map(draw_rows, mesh=mesh, in_specs=(spec,) * 5 + (PartitionSpec(),),
                           out_specs={"image": data, "label": data, "augment_seed": data},
                           check_vma=False)
    return TrainStream(jax.jit(mapped), arrays)


def _key(seed: jax.Array) -> jax.Array:
    return jax.random.key(seed.astype(jnp.uint32), impl="threefry2x32")


def _order(key: jax.Array, epoch: jax.Array, size: jax.Array, rows: int) -> jax.Array:
    """A permutation of range(size) drawn from (key, epoch), padded to `rows` entries: the
    padding rows (size..rows) sort last."""
    u = jax.random.uniform(jax.random.fold_in(key, epoch), (rows,))
    return jnp.argsort(jnp.where(jnp.arange(rows) < size, u, 2.0))


@dataclasses.dataclass
class EvalSplit:
    """An evaluation split on the devices in padded batches, each uint8 (B, H, W, 3) sharded over
    'data', and the canonical row of each row this process holds (-1: padding)."""
    images: list[jax.Array]
    rows: np.ndarray
    host: dict[str, np.ndarray]

    def probabilities(self, predictor: Any) -> dict[str, np.ndarray]:
        """{"patient_id", "cohort", "slice_index", "label", "probability"} of every slice once,
        in canonical order, gathered over processes (what `Predictor.split` returns)."""
        from her2jax import distributed

        local = [distributed.local_rows(predictor.step(predictor.params, predictor.rest,
                                                       {"image": image}))
                 for image in self.images]
        gathered = distributed.allgather_rows({"row": self.rows,
                                               "probability": np.concatenate(local)})
        keep = gathered["row"] >= 0
        order = np.argsort(gathered["row"][keep], kind="stable")
        rows = gathered["row"][keep][order]
        out = {key: self.host[key][rows] for key in ("patient_id", "cohort", "slice_index",
                                                     "label")}
        out["probability"] = gathered["probability"][keep][order].astype(np.float64)
        return out


def eval_split(host: dict[str, np.ndarray], mesh: Mesh, batch: int) -> EvalSplit:
    """`host` (`read_split`) in batches of `batch` (a multiple of the devices), the last one
    padded."""
    from her2jax import distributed

    n = len(host["label"])
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    images, rows = [], []
    for start in range(0, max(n, 1), batch):
        image = np.zeros((batch, *host["image"].shape[1:]), np.uint8)
        row = np.full(batch, -1, np.int32)
        part = host["image"][start:start + batch]
        image[:len(part)] = part
        row[:len(part)] = np.arange(start, start + len(part))
        images.append(_put(image, sharding))
        rows.append(distributed.local_rows(_put(row, sharding)))
    return EvalSplit(images, np.concatenate(rows), host)
