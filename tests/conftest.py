"""Shared test helpers: a tiny BreastDCEDL-style cohort written in seconds, and a prepare runner."""
from __future__ import annotations

import csv
import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")   # no Keras import (her2jax.data.tensorflow_host)

# One JAX compilation cache for the whole session: the test processes and every command they
# start (training, evaluation, sweeps on each backend) compile a program once, not once per
# process. Created here in the first process (the xdist controller), inherited by the workers and
# their subprocesses through the environment, removed when the session ends. JAX keys an entry by
# the program, its devices and its flags, so a cached executable is the one a compile would give.
# Every compile is kept, the small ones too: a model's initialisation is dozens of eager random
# ops of 0.1-0.3 s each, which every process that builds a model would otherwise compile again.
# No size limit: with one, JAX takes a file lock and scans every entry at each write, which with
# thousands of small entries cost more than the cache saved (the suite took 30.5 min, against 24
# when only compiles over 0.5 s were kept, and 21.3 without the limit).
# Without the lock a read that races a write of the same entry fails to decompress; JAX then warns
# and compiles, so a race costs a compile, never a wrong executable.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="her2jax-test-jax-cache-")
    os.environ["HER2JAX_TEST_OWNS_JAX_CACHE"] = str(os.getpid())
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# torchvision (through torch._dynamo and triton) crashes the process when it is imported after
# TensorFlow, the other way round works: the reference models load first in every test process.
import torchvision  # noqa: E402, F401

import numpy as np  # noqa: E402
import pytest  # noqa: E402

SHAPE = (10, 40, 40)            # (z, y, x)
TUMOUR = (slice(3, 7), slice(14, 24), slice(16, 28))
COLUMNS_V2 = ["pid", "pCR", "n_xy", "n_z", "n_times", "pre", "post_early", "post_late",
              "slice_thick", "xy_spacing", "mask_start", "mask_end", "sraw", "eraw", "scol",
              "ecol", "tum_vol", "age", "menopause", "race_white", "race_black", "HR", "HER2",
              "HR_HER2_STATUS", "TripleNeg", "HER2pos", "HRposHER2neg", "dataset", "test"]


def phase_volume(rng: np.random.Generator, t: int, mask: np.ndarray) -> np.ndarray:
    """Background texture plus a tumour that brightens with time point t (float32, z y x)."""
    volume = rng.uniform(100, 600, SHAPE) + 250.0 * t * mask
    return volume.astype(np.float32)


def save_zyx(array: np.ndarray, path: str) -> None:
    """Writes a (z, y, x) array the BreastDCEDL way: straight into NIfTI, identity affine."""
    import nibabel as nib  # here, not at the top: the model tests run where nibabel is absent

    nib.save(nib.Nifti1Image(array, np.eye(4)), path)


def write_cohort(folder: str, patients: int = 8, times: int = 4, seed: int = 0,
                 splits: list[int] | None = None, planted: bool = False) -> list[dict]:
    """A tiny I-SPY2-named cohort with the 29-column metadata; returns the CSV rows.

    planted: only HER2-positive tumours enhance (the others look like background), so a model
    can learn the label from the tumour region alone."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "dce"), exist_ok=True)
    os.makedirs(os.path.join(folder, "mask"), exist_ok=True)
    splits = splits or [(0, 0, 0, 0, 1, 2)[i % 6] for i in range(patients)]
    rows = []
    for i in range(patients):
        pid = f"T-{i:03d}"
        mask = np.zeros(SHAPE, np.int32)
        mask[TUMOUR] = 1
        her2 = int(i % 3 == 0)
        for t in range(times):
            save_zyx(phase_volume(rng, t, mask * (her2 or not planted)),
                     os.path.join(folder, "dce", f"{pid}_spy2_vis1_dce_aqc_{t}.nii.gz"))
        save_zyx(mask, os.path.join(folder, "mask", f"{pid}_spy2_vis1_mask.nii.gz"))
        row = dict.fromkeys(COLUMNS_V2, "0")
        row.update(pid=pid, n_xy=SHAPE[1], n_z=SHAPE[0], n_times=times, pre=0, post_early=1,
                   post_late=times - 1, slice_thick=2.5, xy_spacing=0.7, mask_start=3,
                   mask_end=6, sraw=14, eraw=23, scol=16, ecol=27, HER2=her2, HER2pos=her2,
                   dataset="spy2", test=splits[i])
        rows.append(row)
    write_csv(os.path.join(folder, "metadata.csv"), rows, COLUMNS_V2)
    return rows


def write_csv(path: str, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def strict_json(path) -> object:
    """A .json file's value or a .jsonl file's list of values, read as strict JSON: NaN,
    Infinity and -Infinity, which most JSON readers refuse, fail the test naming the file."""
    import json

    def refuse(constant):
        raise AssertionError(f"{path}: {constant} is not JSON")

    text = open(path, encoding="utf-8").read()
    if str(path).endswith(".jsonl"):
        return [json.loads(line, parse_constant=refuse) for line in text.splitlines()
                if line.strip()]
    return json.loads(text, parse_constant=refuse)


def assert_strict_json_tree(folder) -> list[str]:
    """Every .json and .jsonl file under `folder` is strict JSON; returns their names."""
    found = []
    for path, _, names in os.walk(folder):
        for name in names:
            if name.endswith((".json", ".jsonl")):
                strict_json(os.path.join(path, name))
                found.append(name)
    assert found, f"no JSON file under {folder}"
    return found


def prepare_args(source: str, data_dir: str, *extra: str) -> list[str]:
    return ["--source", source, "--data_dir", data_dir, "--image_size", "16", "--workers", "1",
            "--quiet", *extra]


@pytest.fixture
def cohort(tmp_path):
    folder = str(tmp_path / "cohort")
    rows = write_cohort(folder)
    return folder, rows


def pytest_unconfigure(config):
    """The process that created the session's compilation cache removes it."""
    if os.environ.get("HER2JAX_TEST_OWNS_JAX_CACHE") == str(os.getpid()):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


# The files that take longest (pytest --durations, 2 cores), first in the collection: `make test`
# runs `--dist loadfile --no-loadscope-reorder`, so each worker takes the next file in this order
# as it finishes one, longest first, and no long file is left to run alone at the end while the
# other worker idles. The order changes no result.
LONGEST_FIRST = ("test_train.py", "test_demo.py", "test_gpu_script.py", "test_slurm.py",
                 "test_torch_compare.py", "test_steps.py", "test_sweep.py", "test_vit.py",
                 "test_explain.py", "test_multiprocess.py", "test_tpu_standin.py",
                 "test_evaluate.py", "test_augmentation.py", "test_layers.py", "test_resnet.py",
                 "test_jax_variants.py", "test_gpu_vit_script.py", "test_gpu_augment_script.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: files keep order
