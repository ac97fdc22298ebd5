"""Two real processes on localhost (gloo collectives) train together: they agree on the
parameters, evaluation gathers every slice from both shares, and only process 0 writes logs."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from test_train import prepared

from conftest import write_cohort
from her2jax import distributed
from her2jax.data import pipeline as input_pipeline

WORKER = os.path.join(os.path.dirname(__file__), "multiprocess_worker.py")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    folder = str(root / "cohort")
    # a validation split with both classes: its AUC is defined, so the best manager saves too
    write_cohort(folder, patients=12, splits=[0, 0, 0, 2, 2, 1, 0, 0, 0, 0, 2, 1])
    data_dir = prepared(folder)
    workdir, out = str(root / "run"), str(root / "out")
    os.makedirs(out)
    port = free_port()
    # no inherited multi-process or device settings, and no compilation cache: two processes
    # whose programs were all in it once hung at a coordination barrier
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "XLA_"))}
    workers = [subprocess.Popen([sys.executable, WORKER, str(port), str(i), data_dir, workdir,
                                 out], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = []
    try:
        for worker in workers:
            logs.append(worker.communicate(timeout=600)[0])
    finally:
        for worker in workers:
            worker.kill()
    for i, worker in enumerate(workers):
        assert worker.returncode == 0, f"process {i} failed:\n{logs[i][-4000:]}"
    return data_dir, workdir, out


def test_both_processes_hold_the_same_parameters(two_process_run):
    _, _, out = two_process_run
    infos = [json.load(open(os.path.join(out, f"process_{i}.json"))) for i in range(2)]
    assert [(i["process_index"], i["process_count"], i["devices"]) for i in infos] == \
        [(0, 2, 2), (1, 2, 2)]
    assert infos[0]["kind"] == "explicit" and infos[0]["step"] == infos[1]["step"] == 2
    first, second = (np.load(os.path.join(out, f"process_{i}.npz")) for i in range(2))
    assert len(first.files) == len(second.files) > 50
    for key in first.files:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)


def test_each_checkpoint_manager_keeps_its_own_barriers(two_process_run):
    # the latest and best managers both save step 2 from background threads at once: a barrier
    # key the two shared could pair one manager's process 0 with the other's process 1 (seen
    # as a coordination-service abort under load), so every commit barrier is distinct
    _, _, out = two_process_run
    keys = [json.load(open(os.path.join(out, f"barriers_{i}.json"))) for i in range(2)]
    assert sorted(keys[0]) == sorted(keys[1])     # the same barriers, in either order
    commits = [key for key in keys[0] if "async_write_complete" in key]
    assert len(commits) == 2, keys[0]            # step 2 saved by the latest and best managers
    assert len(set(commits)) == 2, commits
    assert len({key for key in keys[0] if "set_value_start" in key}) == 2, keys[0]


def test_evaluation_gathers_every_slice_from_both_processes(two_process_run):
    data_dir, workdir, out = two_process_run
    infos = [json.load(open(os.path.join(out, f"process_{i}.json"))) for i in range(2)]
    builder = input_pipeline.open_dataset(data_dir)
    validation = builder.info.splits["validation"].num_examples
    # each process read only its share, the report covers the whole split, the same on both
    assert infos[0]["report"]["slices"] == infos[1]["report"]["slices"] == validation
    assert infos[0]["report"] == infos[1]["report"]
    with open(os.path.join(workdir, "metrics.jsonl")) as handle:
        rows = [json.loads(line) for line in handle]
    assert [(r["step"], r["split"]) for r in rows] == \
        [(1, "train"), (2, "train"), (2, "validation")]   # process 0 alone writes


def test_the_device_resident_source_across_two_processes(two_process_run):
    """Replicated, the two processes' rows make up the one-device stream's batches; sharded,
    each process draws epochs of its own half of the split; the resident evaluation gathers the
    rows the TFRecord path does."""
    from her2jax.data import resident
    from her2jax.training import steps

    data_dir, _, out = two_process_run
    first, second = (np.load(os.path.join(out, f"resident_{i}.npz")) for i in range(2))
    host = resident.read_split(data_dir, "train")
    alone = resident.train_stream(host, steps.data_mesh(), global_batch_size=4, seed=1,
                                  balance="none", layout="replicated")
    expected = np.stack([np.asarray(alone.batch(i)["image"]) for i in range(12)])
    np.testing.assert_array_equal(
        np.concatenate([first["replicated"], second["replicated"]], axis=1), expected)
    index = {image.tobytes(): i for i, image in enumerate(host["image"])}
    n = len(host["image"])
    for p, rows in enumerate((first["sharded"], second["sharded"])):
        drawn = [index[image.tobytes()] for image in rows.reshape(-1, *rows.shape[2:])]
        share = list(range(p * n // 2, (p + 1) * n // 2))
        assert sorted(drawn[:len(share)]) == share, (p, drawn)
    for rows in (first, second):
        np.testing.assert_array_equal(rows["eval_device"], rows["eval_tfrecord"])
        np.testing.assert_array_equal(rows["eval_device_slices"], rows["eval_tfrecord_slices"])
        assert len(rows["eval_device"]) == len(resident.read_split(data_dir, "validation")["label"])


def test_allgather_rows_is_the_identity_in_one_process():
    rows = distributed.allgather_rows({"id": np.array([b"a", b"bb"], dtype=object),
                                       "p": np.array([0.1, 0.2]), "v": np.array([True, False])})
    assert list(rows["id"]) == [b"a", b"bb"] and rows["v"].dtype == bool


@pytest.mark.parametrize("environ, expected", [
    ({}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, "slurm"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "1"}, None),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "openmpi"),
    ({"TPU_WORKER_HOSTNAMES": "t1"}, None),
    ({"TPU_WORKER_HOSTNAMES": "t1,t2"}, "tpu"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
     "explicit"),
])
def test_detect_reads_the_environment(environ, expected):
    assert distributed.detect(environ) == expected


def test_initialize_refuses_partial_settings_and_stays_single_when_nothing_is_detected():
    with pytest.raises(ValueError, match="go together"):
        distributed.initialize("auto", coordinator_address="127.0.0.1:1")
    with pytest.raises(ValueError, match="multihost mode"):
        distributed.initialize("sometimes")
    assert distributed.initialize("auto", environ={}) is None
    assert distributed.initialize("off", environ={"OMPI_COMM_WORLD_SIZE": "2"}) is None
