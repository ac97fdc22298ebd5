"""The dataset resident on the device (config.input.source='device'): the layout and its
refusal, the draws (epochs without replacement, class and patient balance, a pure function of
the step), and, on two devices, the same stream as one device when replicated, each device's
own share when sharded, and evaluation rows equal to the TFRecord path's."""
from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from her2jax.data import resident
from her2jax.training import steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def host_split(labels: list[int], patients: list[str], size: int = 4) -> dict[str, np.ndarray]:
    """Examples whose image is its own index (pixel [0, 0, 0] low byte, [0, 0, 1] high byte)."""
    n = len(labels)
    image = np.zeros((n, size, size, 3), np.uint8)
    image[:, 0, 0, 0], image[:, 0, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
    return {"image": image, "label": np.array(labels, np.int32),
            "patient_id": np.array(patients, dtype=object),
            "cohort": np.array(["c"] * n, dtype=object),
            "slice_index": np.arange(n, dtype=np.int32)}


def drawn(stream: resident.TrainStream, batches: int, start: int = 0) -> np.ndarray:
    """The example index of every row of batches start..start + batches - 1."""
    rows = []
    for index in range(start, start + batches):
        image = np.asarray(stream.batch(index)["image"])
        rows.append(image[:, 0, 0, 0].astype(np.int64) + 256 * image[:, 0, 0, 1].astype(np.int64))
    return np.concatenate(rows)


def test_layout_replicates_what_fits_shards_what_fits_sharded_and_refuses_the_rest():
    gib = 2**30
    assert resident.choose_layout(gib, gib, 4, 9 * gib) == "replicated"   # 1.25 <= 2.25
    assert resident.choose_layout(4 * gib, gib, 4, 9 * gib) == "sharded"  # 1.25 <= 4.5
    with pytest.raises(resident.DoesNotFit, match=r"need 5368709120 bytes \(5.00 GiB\) on each "
                                                  r"device even sharded over 2 .* 9663676416 "
                                                  r"bytes \(9.00 GiB\) free"):
        resident.choose_layout(8 * gib, 2 * gib, 2, 9 * gib)


def test_unbalanced_draws_are_epochs_without_replacement_and_a_function_of_the_step():
    host = host_split([i % 2 for i in range(10)], [f"p{i // 2}" for i in range(10)])
    stream = resident.train_stream(host, steps.data_mesh(), global_batch_size=4, seed=3,
                                   balance="none", layout="replicated")
    order = drawn(stream, 10)                                  # 40 rows: four epochs of 10
    for epoch in range(4):
        assert sorted(order[10 * epoch:10 * (epoch + 1)]) == list(range(10)), epoch
    assert len({tuple(order[10 * e:10 * (e + 1)]) for e in range(4)}) == 4   # reshuffled
    again = resident.train_stream(host, steps.data_mesh(), global_batch_size=4, seed=3,
                                  balance="none", layout="replicated")
    np.testing.assert_array_equal(drawn(again, 3, start=7), order[28:40])   # a resume
    other = resident.train_stream(host, steps.data_mesh(), global_batch_size=4, seed=4,
                                  balance="none", layout="replicated")
    assert not np.array_equal(drawn(other, 10), order)
    seeds = np.asarray(stream.batch(2)["augment_seed"])
    assert seeds.dtype == np.uint32 and list(seeds[:, 1]) == [8, 9, 10, 11]   # (seed, t)
    assert len(set(seeds[:, 0])) == 1


@pytest.mark.parametrize("balance", ["class", "patient"])
def test_balanced_draws_give_every_class_or_patient_the_same_share(balance):
    # 3 positives of 12; patients of 1, 2, 3 and 6 slices
    labels = [1, 1, 1] + [0] * 9
    patients = ["a"] + ["b"] * 2 + ["c"] * 3 + ["d"] * 6
    host = host_split(labels, patients)
    stream = resident.train_stream(host, steps.data_mesh(), global_batch_size=8, seed=0,
                                   balance=balance, layout="replicated")
    chosen = drawn(stream, 500)                                # 4000 draws
    groups = np.array(labels if balance == "class" else patients)[chosen]
    shares = {g: c / len(chosen) for g, c in collections.Counter(groups.tolist()).items()}
    expected = 1 / len(set(labels if balance == "class" else patients))
    assert shares == pytest.approx(dict.fromkeys(shares, expected), abs=0.03), shares
    assert len(shares) == (2 if balance == "class" else 4)


TWO_DEVICES = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec
sys.path.insert(0, "tests")
from test_resident import drawn, host_split
from her2jax.data import resident
from her2jax.training import steps
assert jax.device_count() == 2
two, one = steps.data_mesh(), steps.data_mesh(jax.devices()[:1])
host = host_split([i % 2 for i in range(11)], [f"p{i}" for i in range(11)])
out = {}
for balance in ("none", "class"):
    kwargs = dict(global_batch_size=4, seed=1, balance=balance)
    out[balance] = [drawn(resident.train_stream(host, mesh, layout="replicated", **kwargs), 8)
                    .tolist() for mesh in (one, two)]
sharded = resident.train_stream(host, two, global_batch_size=4, seed=1, balance="none",
                                layout="sharded")
out["sharded"] = drawn(sharded, 8).reshape(8, 2, 2).transpose(1, 0, 2).reshape(2, -1).tolist()
out["sharded_seeds"] = np.asarray(sharded.batch(1)["augment_seed"]).tolist()
out["tensorflow"] = "tensorflow" in sys.modules          # the streams run without it
from her2jax.training import inference
# evaluation: the resident split against the TFRecord path, with a step that needs no model
data_dir = sys.argv[1]
step = jax.jit(lambda p, r, b: jnp.mean(b["image"].astype(jnp.float32), axis=(1, 2, 3)),
               in_shardings=(None, None, NamedSharding(two, PartitionSpec("data"))),
               out_shardings=NamedSharding(two, PartitionSpec("data")))
predictor = inference.Predictor(step, None, None, two)
on_device = resident.eval_split(resident.read_split(data_dir, "validation"), two, 4)
rows = {"device": on_device.probabilities(predictor),
        "tfrecord": predictor.split(data_dir, "validation", batch_size=3)}
out["eval"] = {k: {c: [str(x) if c in ("patient_id", "cohort") else float(x) for x in v]
                   for c, v in r.items()} for k, r in rows.items()}
print(json.dumps(out))
"""


def test_two_devices_replicated_stream_equals_one_device_sharded_shares_and_evaluation(tmp_path):
    # here, not at the top: the subprocess imports this module, and conftest loads torchvision
    from conftest import prepare_args, write_cohort

    from data_prep import prepare

    cohort = str(tmp_path / "cohort")
    write_cohort(cohort, patients=6)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert prepare.main(prepare_args(cohort, str(tmp_path / "data"))) == 0
    data_dir = printed.getvalue().splitlines()[-1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", TWO_DEVICES, data_dir], cwd=ROOT, env=env,
                          text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.splitlines()[-1])
    for balance in ("none", "class"):
        on_one, on_two = out[balance]
        assert on_one == on_two, balance            # the stream ignores the device count
    # sharded: device 0 holds examples 0..4, device 1 5..10; each draws epochs of its own share
    first, second = out["sharded"]
    assert sorted(first[:5]) == sorted(first[5:10]) == list(range(5)), first
    assert sorted(second[:6]) == sorted(second[6:12]) == list(range(5, 11)), second
    assert out["tensorflow"] is False
    seeds = out["sharded_seeds"]                   # (device seed, that device's position)
    assert [s[1] for s in seeds] == [2, 3, 2, 3] and seeds[0][0] != seeds[2][0]
    device, tfrecord = out["eval"]["device"], out["eval"]["tfrecord"]
    assert device == tfrecord and len(device["probability"]) > 3
