"""her2jax.training.events against TensorFlow's own event reader, which checks every record's
checksums and parses the `Event` protocol buffers: what a run log writes is what TensorBoard
reads."""
from __future__ import annotations

import os

import numpy as np
import pytest

from her2jax.data.tensorflow_host import tf
from her2jax.training import events
from her2jax.training.run_log import RunLog


def read(path: str) -> list:
    return list(tf.compat.v1.train.summary_iterator(path))


def scalars(read_events: list) -> list[tuple[int, str, float]]:
    return [(e.step, v.tag, v.simple_value) for e in read_events for v in e.summary.value]


def test_crc32c_check_value():
    assert events.crc32c(b"123456789") == 0xE3069283    # the Castagnoli polynomial's check value
    assert events.crc32c(b"") == 0


def test_tensorflow_reads_what_the_writer_wrote(tmp_path):
    writer = events.EventWriter(str(tmp_path / "tb"))
    values = [("train/loss", 0.6931, 0), ("train/loss", 0.25, 1), ("validation/auc", 0.8, 1),
              ("train/learning_rate", 3e-4, 300), ("train/loss", 1.5, 2 ** 40)]
    for tag, value, step in values:
        writer.add_scalar(tag, value, step)
    writer.close()
    (name,) = os.listdir(tmp_path / "tb")
    assert "tfevents" in name       # TensorBoard finds event files by this
    read_back = read(writer.path)
    assert read_back[0].file_version == events.FILE_VERSION
    assert scalars(read_back[1:]) == [(step, tag, pytest.approx(float(np.float32(value))))
                                      for tag, value, step in values]
    assert all(e.wall_time > 1e9 for e in read_back)


def test_a_damaged_record_is_refused_by_the_reader(tmp_path):
    """The reader verifies the checksums: so the passing read above checked ours."""
    writer = events.EventWriter(str(tmp_path))
    writer.add_scalar("train/loss", 0.5, 7)
    writer.close()
    data = bytearray(open(writer.path, "rb").read())
    data[-6] ^= 0x01                 # a bit of the last record's data (its float value)
    open(writer.path, "wb").write(bytes(data))
    with pytest.raises(tf.errors.DataLossError):
        read(writer.path)


def test_a_run_log_writes_train_and_evaluation_scalars(tmp_path):
    log = RunLog(tmp_path / "run", total_steps=4)
    log.train(2, [{"loss": 0.7, "accuracy": 0.5}, {"loss": 0.5, "accuracy": 1.0}], 1e-3, 8)
    log.evaluation(2, "validation", {"auc": 0.75, "auc_ci_low": 0.5, "auc_ci_high": 1.0,
                                     "accuracy": 0.5, "patients": 4, "aggregation": "median",
                                     "sensitivity": float("nan")})
    log.close()
    folder = tmp_path / "run" / "tensorboard"
    (name,) = os.listdir(folder)
    found = {(step, tag): value for step, tag, value in scalars(read(str(folder / name)))}
    assert found[(2, "train/loss")] == pytest.approx(0.6)
    assert found[(2, "train/learning_rate")] == pytest.approx(1e-3)
    assert found[(2, "validation/auc")] == 0.75
    assert (2, "validation/sensitivity") not in found      # NaN is left out, as before
    assert (2, "train/images_per_second") not in found     # no rate for a launch's first log
