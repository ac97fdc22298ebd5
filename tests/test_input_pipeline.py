"""Tests of her2jax.data.pipeline on a tiny prepared dataset (16 px, patients of 1 to 4 slices)."""
from __future__ import annotations

import ast
import collections
import contextlib
import importlib
import io
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from conftest import SHAPE, TUMOUR, prepare_args, save_zyx, write_cohort
from data_prep import prepare


class Lazy:
    """A module imported at its first use. TensorFlow must not load while pytest collects: loaded
    before torchvision (which other test files import), it makes triton's import crash."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attribute: str):
        if attribute.startswith("_"):  # pytest probes (__test__, _pytestfixturefunction, ...)
            raise AttributeError(attribute)
        return getattr(importlib.import_module(self._name), attribute)


tf, tfds = Lazy("tensorflow"), Lazy("tensorflow_datasets")
input_pipeline = Lazy("her2jax.data.pipeline")
augment, records, sampling = (Lazy(f"her2jax.data.{name}")
                              for name in ("augment_host", "records", "sampling"))
ROOT = pathlib.Path(__file__).resolve().parents[1]
# tumour slices per patient: 10 training patients (every third HER2+, each with one slice, so
# 4 of 23 training slices are positive), then 2 validation patients
SLICES = [1, 4, 2, 1, 3, 4, 1, 2, 4, 1, 4, 4]
SPLITS = [0] * 10 + [2] * 2


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> types.SimpleNamespace:
    """The dataset prepared once, and its training examples read with TFDS alone."""
    base = tmp_path_factory.mktemp("input_pipeline")
    folder = str(base / "cohort")
    write_cohort(folder, patients=len(SLICES), splits=SPLITS)
    for i, count in enumerate(SLICES):
        mask = np.zeros(SHAPE, np.int32)
        mask[3:3 + count, TUMOUR[1], TUMOUR[2]] = 1
        save_zyx(mask, os.path.join(folder, "mask", f"T-{i:03d}_spy2_vis1_mask.nii.gz"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert prepare.main(prepare_args(folder, str(base / "prepared"),
                                         "--slices_per_patient", "0")) == 0
    path = out.getvalue().splitlines()[-1]
    builder = tfds.builder_from_directory(path)
    stored = list(tfds.as_numpy(builder.as_dataset(split="train", shuffle_files=False)))
    by_image = {e["image"].tobytes(): e for e in stored}
    assert len(stored) == sum(SLICES[:10]) and len(by_image) == len(stored)  # images identify
    return types.SimpleNamespace(path=path, stored=stored, by_image=by_image)


def images_of(iterator, count: int) -> list[np.ndarray]:
    """The first `count` images of a batch iterator, batches flattened."""
    images = []
    while len(images) < count:
        images.extend(next(iterator)["image"])
    return images[:count]


def multiset(images) -> collections.Counter:
    return collections.Counter(np.asarray(image).tobytes() for image in images)


def train(data, **kwargs):
    arguments = {"global_batch_size": 4, "seed": 0, "augment": {}} | kwargs
    return input_pipeline.train_iterator(data.path, **arguments)


def take(iterator, count: int) -> list[dict[str, np.ndarray]]:
    return [next(iterator) for _ in range(count)]


# ---- batches and process shares ------------------------------------------------------------

def test_batch_shapes_and_dtypes(data):
    batch = next(train(data, augment=input_pipeline.DEFAULT_AUGMENT))
    assert batch.keys() == {"image", "label"}
    assert batch["image"].dtype == np.uint8 and batch["image"].shape == (4, 16, 16, 3)
    assert batch["label"].dtype == np.int32 and batch["label"].shape == (4,)
    half = next(train(data, process_index=1, process_count=2))
    assert half["image"].shape == (2, 16, 16, 3)
    with pytest.raises(ValueError, match="multiple of the process count"):
        train(data, global_batch_size=5, process_count=2, process_index=0)


def test_two_processes_read_disjoint_shares_covering_the_split(data):
    shares = []
    for index in range(2):
        size = sum(int(b["valid"].sum()) for b in input_pipeline.eval_batches(
            data.path, split="train", global_batch_size=4, process_index=index, process_count=2))
        shares.append(multiset(images_of(train(data, process_index=index, process_count=2), size)))
    assert [sum(s.values()) for s in shares] == [11, 12]
    assert not shares[0] & shares[1]
    assert shares[0] + shares[1] == multiset(e["image"] for e in data.stored)


def test_shares_split_files_evenly_and_fall_back_inside_files():
    pieces = [records.share(["a", "b", "c"], [5, 5, 2], index, 2) for index in range(2)]
    assert pieces[0] == [records.Piece("a", 0, 5, 0), records.Piece("b", 0, 1, 5)]
    assert pieces[1] == [records.Piece("b", 1, 4, 0), records.Piece("c", 0, 2, 4)]
    one_file = [records.share(["a"], [5], index, 3) for index in range(3)]
    assert one_file == [[records.Piece("a", 0, 1, 0)], [records.Piece("a", 1, 2, 0)],
                        [records.Piece("a", 3, 2, 0)]]


# ---- evaluation ----------------------------------------------------------------------------

def test_eval_yields_every_example_once_and_pads_the_last_batch(data):
    batches = list(input_pipeline.eval_batches(data.path, split="train", global_batch_size=5))
    assert len(batches) == math.ceil(23 / 5)
    assert all(b["image"].shape == (5, 16, 16, 3) for b in batches)
    rows = [{key: b[key][i] for key in b} for b in batches for i in range(5)]
    valid = [r for r in rows if r["valid"]]
    padding = [r for r in rows if not r["valid"]]
    assert len(padding) == 2 and all(
        r["patient_id"] == b"" and not r["image"].any() for r in padding)
    stored = {(e["patient_id"], int(e["slice_index"])): e for e in data.stored}
    assert sorted((r["patient_id"], int(r["slice_index"])) for r in valid) == sorted(stored)
    for row in valid:
        expected = stored[(row["patient_id"], int(row["slice_index"]))]
        np.testing.assert_array_equal(row["image"], expected["image"])
        assert row["label"] == expected["label"]


def test_eval_gives_every_process_the_same_number_of_batches(data):
    per_process = [list(input_pipeline.eval_batches(
        data.path, split="train", global_batch_size=22, process_index=index, process_count=2))
        for index in range(2)]
    # shares of 11 and 12 examples, local batches of 11: the first process pads a whole batch
    assert [len(batches) for batches in per_process] == [2, 2]
    assert [int(b["valid"].sum()) for b in per_process[0]] == [11, 0]
    ids = [(pid, int(z)) for batches in per_process for b in batches
           for pid, z, ok in zip(b["patient_id"], b["slice_index"], b["valid"]) if ok]
    assert sorted(ids) == sorted((e["patient_id"], int(e["slice_index"])) for e in data.stored)


# ---- determinism and resume ----------------------------------------------------------------

def test_same_seed_same_batches_other_seed_differs(data):
    options = {"augment": input_pipeline.DEFAULT_AUGMENT, "balance": "class"}
    first, again = take(train(data, **options), 8), take(train(data, **options), 8)
    other = take(train(data, seed=1, **options), 8)
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(first, again))
    assert not all(np.array_equal(a["image"], b["image"]) for a, b in zip(first, other))


@pytest.mark.parametrize("balance", ["none", "class", "patient"])
def test_resume_yields_the_tail_of_an_uninterrupted_run(data, balance):
    # 23 examples a batch of 4: epochs end inside steps 5 and 11
    options = {"augment": input_pipeline.DEFAULT_AUGMENT, "balance": balance}
    whole = take(train(data, **options), 14)
    resumed = take(train(data, start_step=5, **options), 9)
    for expected, batch in zip(whole[5:], resumed):
        np.testing.assert_array_equal(batch["image"], expected["image"])
        np.testing.assert_array_equal(batch["label"], expected["label"])


# ---- augmentation --------------------------------------------------------------------------

def stored_multiset(data, transform=lambda image: image) -> collections.Counter:
    return multiset(transform(e["image"]) for e in data.stored)


def test_without_augmentation_an_epoch_is_the_stored_images(data):
    assert multiset(images_of(train(data, augment={}), 23)) == stored_multiset(data)


def test_forced_flip_mirrors_every_image(data):
    flipped = images_of(train(data, augment={"flip": 1.0}), 23)
    assert multiset(flipped) == stored_multiset(data, lambda image: image[:, ::-1])


def test_full_scale_crop_is_the_identity_and_smaller_crops_are_not(data):
    full = {"random_resized_crop": {"scale": (1.0, 1.0), "ratio": (3 / 4, 4 / 3)}}
    assert multiset(images_of(train(data, augment=full), 23)) == stored_multiset(data)
    half = {"random_resized_crop": {"scale": (0.4, 0.6)}}
    cropped = multiset(images_of(train(data, augment=half), 23))
    assert not cropped & stored_multiset(data)


def test_rotation_by_zero_is_the_identity_and_by_a_right_angle_is_rot90():
    image = np.random.default_rng(0).integers(0, 256, (6, 6, 3)).astype(np.float32)
    np.testing.assert_array_equal(augment.rotate(tf.constant(image), 0.0).numpy(), image)
    np.testing.assert_allclose(augment.rotate(tf.constant(image), math.pi / 2).numpy(),
                               np.rot90(image, 1), atol=1e-3)


def test_small_rotations_change_images_but_little(data):
    rotated = images_of(train(data, augment={"rotate_degrees": 10.0}), 23)
    assert not multiset(rotated) & stored_multiset(data)
    stored = np.stack([e["image"] for e in data.stored]).astype(float)
    assert np.mean(np.stack(rotated)) == pytest.approx(stored.mean(), rel=0.15)


def test_intensity_is_clipped_not_wrapped():
    bright = tf.fill([4, 4, 3], 250.0)
    assert (augment.to_uint8(augment.adjust_intensity(bright, 1.0, 20.0)).numpy() == 255).all()
    dark = tf.fill([4, 4, 3], 5.0)
    assert (augment.to_uint8(augment.adjust_intensity(dark, 1.0, -20.0)).numpy() == 0).all()
    np.testing.assert_array_equal(augment.to_uint8(tf.constant([-3.0, 254.6, 300.0])).numpy(),
                                  [0, 255, 255])
    spread = tf.constant([[[0.0, 100.0, 200.0]]])
    np.testing.assert_allclose(augment.adjust_intensity(spread, 2.0, 0.0).numpy(),
                               [[[0.0, 100.0, 255.0]]])  # mean 100: 0 -> -100 -> 0, 200 -> 300


def test_all_augmentations_keep_uint8_images_of_the_same_shape(data):
    strong = dict(input_pipeline.DEFAULT_AUGMENT, intensity_jitter=0.9)
    images = np.stack(images_of(train(data, augment=strong), 23))
    assert images.dtype == np.uint8 and images.shape == (23, 16, 16, 3)
    assert images.max() == 255  # strong jitter saturates instead of wrapping


def test_device_augmentation_sends_the_images_as_read_with_their_seeds(data):
    """augment_on='device': the same examples in the same order as host augmentation would
    augment, unaugmented, each with its (augmentation seed, stream position) pair; a resumed
    stream carries on with the same pairs."""
    options = {"augment": input_pipeline.DEFAULT_AUGMENT, "balance": "class"}
    device = take(train(data, augment_on="device", **options), 6)
    plain = take(train(data, augment={}, balance="class"), 6)
    assert device[0].keys() == {"image", "label", "augment_seed"}
    for batch, expected in zip(device, plain):
        np.testing.assert_array_equal(batch["image"], expected["image"])
        np.testing.assert_array_equal(batch["label"], expected["label"])
    seeds = np.concatenate([b["augment_seed"] for b in device])
    assert seeds.dtype == np.uint32 and seeds.shape == (24, 2)
    augment_seed = sampling.derived_seed(0, 0, sampling.AUGMENT)
    np.testing.assert_array_equal(seeds[:, 0], augment_seed)
    np.testing.assert_array_equal(seeds[:, 1], np.arange(24))
    resumed = take(train(data, augment_on="device", start_step=3, **options), 3)
    for batch, expected in zip(resumed, device[3:]):
        np.testing.assert_array_equal(batch["augment_seed"], expected["augment_seed"])
        np.testing.assert_array_equal(batch["image"], expected["image"])
    with pytest.raises(ValueError, match="augment_on 'gpu'"):
        train(data, augment_on="gpu")


def test_unknown_or_out_of_range_options_are_refused():
    with pytest.raises(ValueError, match="unknown augmentation"):
        augment.Augment.from_mapping({"flip_vertical": 0.5})
    with pytest.raises(ValueError, match="probability"):
        augment.Augment.from_mapping({"flip": 2.0})


def test_unknown_balance_is_refused(data):
    with pytest.raises(ValueError, match="balance 'patients'"):
        train(data, balance="patients")


# ---- balancing -----------------------------------------------------------------------------

def test_keep_probabilities_weigh_by_class_or_patient():
    labels, ids = np.array([0, 0, 0, 1]), np.array([b"a", b"a", b"b", b"c"], object)
    np.testing.assert_allclose(sampling.keep_probabilities("class", labels, ids),
                               [1 / 3, 1 / 3, 1 / 3, 1])
    np.testing.assert_allclose(sampling.keep_probabilities("patient", labels, ids),
                               [0.5, 0.5, 1, 1])
    assert sampling.keep_probabilities("none", labels, ids) is None


def test_resume_position_counts_the_kept_examples_of_each_epoch():
    probabilities, seed = np.array([1.0, 0.5, 0.25, 1.0, 0.1]), 3
    lengths = [int(np.sum(sampling.kept(tf.constant(probabilities), seed, e))) for e in range(6)]
    for start in range(sum(lengths)):
        epoch, skip = sampling.resume_position(start, 5, probabilities, seed)
        assert sum(lengths[:epoch]) + skip == start and skip < lengths[epoch]
    assert sampling.resume_position(13, 5, None, seed) == (2, 3)
    # one example kept half the time: the position lies beyond the first block of epochs counted
    single = np.array([0.5])
    kept = np.array([int(sampling.kept(tf.constant(single), seed, e)[0]) for e in range(2048)])
    start = int(kept[:1500].sum())
    expected_epoch = int(np.flatnonzero(np.cumsum(kept) == start + 1)[0])
    assert sampling.resume_position(start, 1, single, seed) == (expected_epoch, 0)
    assert expected_epoch > sampling.EPOCH_BLOCK


def sampled(data, balance: str, steps: int = 200) -> types.SimpleNamespace:
    """Labels, patients (counts) and distinct images of `steps` batches of 8."""
    batches = take(train(data, global_batch_size=8, balance=balance), steps)
    images = [image.tobytes() for b in batches for image in b["image"]]
    return types.SimpleNamespace(
        labels=np.concatenate([b["label"] for b in batches]),
        patients=collections.Counter(data.by_image[image]["patient_id"] for image in images),
        distinct=set(images))


def test_class_balance_samples_both_labels_equally(data):
    assert sampled(data, "none").labels.mean() < 0.25  # 4 of 23 slices are positive
    balanced = sampled(data, "class")
    assert balanced.labels.mean() == pytest.approx(0.5, abs=0.05)
    assert balanced.distinct == set(data.by_image)  # each epoch keeps other negatives


def test_patient_balance_samples_every_patient_equally(data):
    assert min(sampled(data, "none").patients.values()) / 1600 < 0.06  # 1-slice patients: 1/23
    balanced = sampled(data, "patient")
    assert len(balanced.patients) == 10 and balanced.distinct == set(data.by_image)
    assert all(0.065 < count / 1600 < 0.135 for count in balanced.patients.values())


@pytest.mark.parametrize("balance", ["none", "class", "patient"])
def test_class_weights_come_from_what_the_sampler_draws(data, balance):
    """loss.class_weights weighs the classes as the training stream draws them: under class
    balancing the weights are ones (balanced once, not twice); the class shares they start
    from match the labels the stream actually yields."""
    from her2jax.data import records
    from her2jax.training.losses import class_weights_from_counts

    mass = records.sampled_class_counts(data.path, "train", balance)
    drawn = sampled(data, balance).labels
    assert mass[1] / mass.sum() == pytest.approx(drawn.mean(), abs=0.05)
    weights = class_weights_from_counts(mass)
    if balance == "class":
        np.testing.assert_array_equal(weights, [1.0, 1.0])
    else:
        assert weights[1] > 1.0 > weights[0]


# ---- metadata ------------------------------------------------------------------------------

def test_metadata_and_class_counts(data, tmp_path):
    metadata = input_pipeline.preparation_metadata(data.path)
    assert metadata["preparation"]["image_size"] == 16 and len(metadata["patients"]["train"]) == 10
    assert input_pipeline.open_dataset(data.path).info.splits["train"].num_examples == 23
    np.testing.assert_array_equal(input_pipeline.class_counts(data.path), [19, 4])
    copy = tmp_path / "copy"
    shutil.copytree(data.path, copy)
    del metadata["counts"]
    (copy / "metadata.json").write_text(json.dumps(metadata))
    np.testing.assert_array_equal(input_pipeline.class_counts(str(copy)), [19, 4])
    np.testing.assert_array_equal(input_pipeline.class_counts(str(copy), "validation"), [8, 0])


# ---- global arrays -------------------------------------------------------------------------

def test_to_global_on_one_device(data):
    batch = next(input_pipeline.eval_batches(data.path, split="train", global_batch_size=4))
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    result = input_pipeline.to_global(batch, mesh)
    for key in ("image", "label", "valid", "slice_index"):
        assert isinstance(result[key], jax.Array)
        assert result[key].sharding.is_equivalent_to(
            NamedSharding(mesh, PartitionSpec("data")), batch[key].ndim)
        np.testing.assert_array_equal(np.asarray(result[key]), batch[key])
    assert isinstance(result["patient_id"], np.ndarray)
    assert result["patient_id"].tolist() == batch["patient_id"].tolist()


TWO_DEVICES = """
import sys
import jax, numpy as np
from jax.sharding import Mesh
from her2jax.data import pipeline as input_pipeline
batch = next(input_pipeline.train_iterator(sys.argv[1], global_batch_size=4, seed=0, augment={}))
mesh = Mesh(np.array(jax.devices()), ("data",))
image = input_pipeline.to_global(batch, mesh)["image"]
assert len(jax.devices()) == 2 and image.shape == (4, 16, 16, 3)
shards = sorted(image.addressable_shards, key=lambda shard: shard.index[0].start)
assert [shard.device for shard in shards] == jax.devices()
assert [shard.data.shape for shard in shards] == [(2, 16, 16, 3)] * 2
np.testing.assert_array_equal(np.asarray(shards[1].data), batch["image"][2:])
print("split over", len(shards), "devices")
"""


def test_to_global_splits_the_batch_over_two_devices(data):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", TWO_DEVICES, data.path], env=env, check=False,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "split over 2 devices" in result.stdout


# ---- TensorFlow stays in the input pipeline ------------------------------------------------

def imports_tensorflow(path: pathlib.Path) -> bool:
    """Whether the module imports tensorflow, tensorflow_datasets or her2jax's TensorFlow host
    module anywhere (functions too)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
            if node.module == "her2jax.data":
                names += [f"her2jax.data.{alias.name}" for alias in node.names]
        else:
            continue
        if any(name.split(".")[0] in ("tensorflow", "tensorflow_datasets")
               or name == "her2jax.data.tensorflow_host" for name in names):
            return True
    return False


def test_no_other_her2jax_module_imports_tensorflow():
    """TensorFlow comes in through her2jax.data.tensorflow_host only, which only the tf.data
    modules of her2jax.data import (directly or through the pipeline; the device-resident source
    to read its splits, its streams run without it: test_resident); the device augmentation,
    the options, the models and the training steps do not."""
    package = ROOT / "her2jax"
    data = package / "data"
    importers = {path for path in package.rglob("*.py") if imports_tensorflow(path)}
    assert data / "pipeline.py" in importers  # the scan finds what it looks for
    allowed = {data / f"{name}.py" for name in ("tensorflow_host", "records", "sampling",
                                                "augment_host", "pipeline", "resident")}
    assert not importers - allowed, sorted(str(path) for path in importers - allowed)
    direct = {path for path in package.rglob("*.py")
              if "import tensorflow" in path.read_text()}
    assert direct == {data / "tensorflow_host.py"}, direct


def test_the_input_pipeline_loads_no_keras():
    """TensorFlow's import would load Keras 3 (and scikit-learn) unless tensorflow_host tells it
    otherwise: a fresh process that builds nothing but imports the pipeline has neither."""
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    probe = ("import sys; import her2jax.data.pipeline; "
             "print(sorted(m for m in ('keras', 'sklearn', 'tensorflow') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[-2] == "['tensorflow']", done.stdout
