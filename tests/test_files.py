"""Result files are written whole or not at all (`her2jax.files`), and every writer in the
package goes through it."""
from __future__ import annotations

import os
import re

import pytest

from her2jax import files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# writes that are not results read back whole, each with its reason
ALLOWED = {
    ("her2jax/files.py", "os.open(os.fspath(temporary)"): "the atomic writer itself",
    ("her2jax/files.py", 'os.fdopen(descriptor, "wb")'): "the atomic writer itself",
    ("her2jax/files.py", "epath.Path(path).write_bytes(data)"): "the writer's one upload to a "
                                                                "bucket",
    ("her2jax/training/run_log.py", 'path.open("a")'): "metrics.jsonl: one line appended "
                                                       "per record by its one writer",
    ("her2jax/training/run_log.py", "(target / event_file.name).write_bytes"): "TensorBoard "
        "event files copied to a bucket, whole objects",
    ("her2jax/training/events.py", '.open("ab")'): "TensorBoard event records, appended",
    ("her2jax/models/weights.py", "local.write_bytes(source.read_bytes())"): "a temporary local "
        "copy of a remote weight file",
    ("launch/sweep.py", 'with open(path, "w") as handle:'): "a temporary file for gcloud",
    ("her2jax/lock.py", "os.open(path, os.O_RDWR | os.O_CREAT"): (
        "a lock file (sweep folder, dataset being prepared)"),
    ("data_prep/pipeline.py", 'open(path + ".partial", "wb")'): "written as .partial, then "
                                                                 "renamed",
    ("data_prep/synthetic/cohort.py", ".write_bytes(gzip.compress("): "the synthetic test "
                                                                      "cohort's volumes",
    ("data_prep/synthetic/cohort.py", 'with open(path, "w", newline="")'): "the synthetic test "
                                                                           "cohort's CSV",
}
WRITES = re.compile(r"\.write_text\(|\.write_bytes\(|open\([^)]*[\"'][wa]b?[\"']|"
                    r"\.open\([\"'][wa]b?[\"']|savefig\((?!buffer)|os\.open\(")


def test_a_write_replaces_the_file_whole_with_the_umask_permissions(tmp_path):
    target = tmp_path / "metrics.json"
    files.write_json(target, {"auc": 0.5}, indent=2)
    files.write_text(target, '{"auc": 0.75}\n')
    assert target.read_text() == '{"auc": 0.75}\n'
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(target).st_mode & 0o777 == 0o666 & ~mask
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_a_write_that_fails_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    """A full disk (ENOSPC while flushing) mid-write: the old result stays, nothing else."""
    target = tmp_path / "report.md"
    files.write_text(target, "previous\n")

    def full(descriptor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        files.write_text(target, "new text that never lands\n")
    assert target.read_text() == "previous\n"
    assert os.listdir(tmp_path) == ["report.md"]


def test_every_writer_in_the_package_goes_through_the_atomic_writer():
    found = set()
    for package in ("her2jax", "launch", "data_prep"):
        for folder, _, names in os.walk(os.path.join(ROOT, package)):
            for name in names:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(folder, name)
                relative = os.path.relpath(path, ROOT)
                for number, line in enumerate(open(path), 1):
                    if not WRITES.search(line) or "files.write_" in line:
                        continue
                    allowed = [key for key in ALLOWED
                               if key[0] == relative and key[1] in line]
                    assert allowed, (f"{relative}:{number} writes a file without "
                                     f"her2jax.files: {line.strip()}")
                    found.update(allowed)
    assert found == set(ALLOWED), f"stale exceptions: {set(ALLOWED) - found}"


def test_a_folder_under_a_file_is_refused_before_a_command_reads_anything(tmp_path, capsys):
    from configs import resnet
    from data_prep import prepare
    from her2jax.errors import InvalidSetting
    from her2jax.training import loop

    blocker = tmp_path / "afile"
    blocker.write_text("")
    assert prepare.main(["--source", str(tmp_path), "--data_dir", str(blocker / "data")]) == 1
    assert capsys.readouterr().err == (f"error: --data_dir {blocker / 'data'}: {blocker} is a "
                                       "file, not a folder\n")
    config = resnet.get_config("resnet18,runlocal")
    config.data_dir = str(tmp_path / "nowhere")     # never read: the run folder is refused first
    with pytest.raises(InvalidSetting, match=f"^--workdir {blocker / 'run'}: {blocker} is a "
                                             "file, not a folder$"):
        loop.train_pack([config], [str(blocker / "run")])
    files.check_folder(tmp_path / "new" / "deeper", "--workdir")    # creatable: accepted
    files.check_folder("gs://bucket/run", "--workdir")              # buckets: not checked here


def test_a_folder_without_write_permission_is_refused_in_one_line(tmp_path):
    """The command runs as a user who may not write in the folder: as root (who may write
    anywhere), without the capabilities that override file permissions; otherwise as the user
    it is. It refuses before it reads the source."""
    import ctypes
    import subprocess
    import sys

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)

    def without_permission_override():
        if os.geteuid() == 0:
            libc = ctypes.CDLL(None, use_errno=True)
            for capability in (1, 2):          # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
                if libc.prctl(24, capability, 0, 0, 0) != 0:          # PR_CAPBSET_DROP
                    raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")

    target = locked / "data"
    try:
        result = subprocess.run(
            [sys.executable, "-m", "data_prep.prepare", "--source", str(tmp_path / "none"),
             "--data_dir", str(target)], cwd=ROOT, capture_output=True, text=True,
            preexec_fn=without_permission_override,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    finally:
        locked.chmod(0o755)
    assert result.returncode == 1, result.stderr
    assert result.stderr == f"error: --data_dir {target}: no permission to write in {locked}\n"


def test_json_is_written_strict_with_the_reason_of_each_undefined_figure(tmp_path):
    """NaN and infinities (Python or numpy) become null, with the reason beside a known figure;
    a strict parser reads the file back."""
    import json
    import math

    import numpy as np

    from conftest import strict_json

    value = {"auc": 0.75, "ppv": math.nan, "rates": [np.float32(0.5), np.inf],
             "patient": {"npv": np.float64("nan"), "counts": np.array([1, 2])},
             "custom": -math.inf, "threshold": {"value": 0.3}}
    files.write_json(tmp_path / "m.json", value, indent=2, allow_nan=True)
    assert strict_json(tmp_path / "m.json") == {
        "auc": 0.75, "ppv": None, "ppv_undefined": "no positive predictions",
        "rates": [0.5, None],
        "patient": {"npv": None, "npv_undefined": "no negative predictions", "counts": [1, 2]},
        "custom": None, "threshold": {"value": 0.3}}
    line = files.json_text({"step": 3, "split": "validation", "auc": math.nan})
    assert json.loads(line) == {"step": 3, "split": "validation", "auc": None,
                                "auc_undefined": "one class only"}
