"""Run and data folders may be buckets (gs://): every file her2jax itself touches goes through
etils.epath. A fake bucket (gs:// mapped onto a local folder, refusing appends as object stores
do) checks the run folder's own files; a scan of the source keeps bare file access out."""
from __future__ import annotations

import ast
import io
import json
import os

import numpy as np
import pytest
from etils import epath
from etils.epath import backend as backend_lib
from etils.epath import gpath

from configs import resnet
from her2jax.data import pipeline as input_pipeline
from her2jax.models import weights
from her2jax.run_folder import RunFolder
from her2jax.training import loop as train
from her2jax.training import run_log

HER2JAX = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "her2jax")


class FakeBucket(backend_lib.Backend):
    """gs://NAME/... -> ROOT/NAME/... on the local disk; no append, like GCS."""

    def __init__(self, root: str):
        self.root = root
        self.opened: list[str] = []

    def local(self, path) -> str:
        text = os.fspath(path)
        assert text.startswith("gs://"), text
        return os.path.join(self.root, text[len("gs://"):])

    def remote(self, path: str) -> str:
        return "gs://" + os.path.relpath(path, self.root)

    def open(self, path, mode):
        if "a" in mode:
            raise io.UnsupportedOperation(f"object stores cannot append ({path})")
        self.opened.append(os.fspath(path))
        return backend_lib.os_backend.open(self.local(path), mode)

    def exists(self, path):
        return backend_lib.os_backend.exists(self.local(path))

    def isdir(self, path):
        return backend_lib.os_backend.isdir(self.local(path))

    def listdir(self, path):
        return backend_lib.os_backend.listdir(self.local(path))

    def glob(self, path):
        return [self.remote(p) for p in backend_lib.os_backend.glob(self.local(path))]

    def walk(self, top, *, top_down=True, on_error=None):
        for root, dirs, files in backend_lib.os_backend.walk(self.local(top), top_down=top_down,
                                                             on_error=on_error):
            yield self.remote(root), dirs, files

    def makedirs(self, path, *, exist_ok=False, mode=0o777):
        backend_lib.os_backend.makedirs(self.local(path), exist_ok=exist_ok, mode=mode)

    def mkdir(self, path, *, exist_ok=False, mode=0o777):
        backend_lib.os_backend.mkdir(self.local(path), exist_ok=exist_ok, mode=mode)

    def rmtree(self, path):
        backend_lib.os_backend.rmtree(self.local(path))

    def remove(self, path):
        backend_lib.os_backend.remove(self.local(path))

    def rename(self, path, dst):
        backend_lib.os_backend.rename(self.local(path), self.local(dst))

    def replace(self, path, dst):
        backend_lib.os_backend.replace(self.local(path), self.local(dst))

    def copy(self, path, dst, overwrite):
        backend_lib.os_backend.copy(self.local(path), self.local(dst), overwrite=overwrite)

    def stat(self, path):
        return backend_lib.os_backend.stat(self.local(path))


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    fake = FakeBucket(str(tmp_path / "bucket_root"))
    original = gpath._GPath._backend
    monkeypatch.setattr(gpath._GPath, "_backend", property(
        lambda self: fake if self._uri_scheme == "gs" else original.fget(self)))
    monkeypatch.chdir(tmp_path)       # a bare open("gs://...") would create ./gs:/... here
    return fake


def test_fake_bucket_refuses_appends(bucket):
    path = epath.Path("gs://b/x.txt")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("one\n")
    with pytest.raises(io.UnsupportedOperation):
        with path.open("a") as handle:
            handle.write("two\n")


def test_run_log_and_run_records_live_in_the_bucket(bucket, tmp_path):
    workdir = epath.Path("gs://lab-bucket/runs/r1")
    workdir.mkdir(parents=True, exist_ok=True)
    config = resnet.get_config("resnet18,runlocal")
    train.check_dataset(RunFolder(workdir), {"preparation": {"image_size": 16,
                                                             "normalization": "x"}})
    log = run_log.RunLog(workdir, total_steps=4)
    log.write_config(config)
    log.train(2, [{"loss": 0.7, "accuracy": 0.5}] * 2, 1e-3, 8)
    report = {"auc": 0.75, "auc_ci_low": 0.5, "auc_ci_high": 1.0, "accuracy": 0.5,
              "patients": 4, "aggregation": "median"}
    log.evaluation(2, "validation", report)
    events = log._events
    assert events is not None and events.exists()
    log.close()
    assert not events.exists(), "the local copy of the event files was left behind"
    log.close()   # twice is harmless
    # a resumed run continues the same metrics file and finds its config again
    log = run_log.RunLog(workdir, total_steps=4)
    log.train(4, [{"loss": 0.6, "accuracy": 0.75}], 5e-4, 8)
    log.close()

    local = tmp_path / "bucket_root" / "lab-bucket" / "runs" / "r1"
    rows = [json.loads(line) for line in (local / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in rows] == [(2, "train"), (2, "validation"),
                                                       (4, "train")]
    assert json.loads((local / "preparation.json").read_text())["image_size"] == 16
    assert list((local / "tensorboard").iterdir()), "event files were not copied up"
    assert RunFolder(workdir).config().model.name == config.model.name
    with pytest.raises(ValueError, match="prepared differently"):
        train.check_dataset(RunFolder(workdir), {"preparation": {"image_size": 32,
                                                                 "normalization": "x"}})
    assert not (tmp_path / "gs:").exists()


def test_dataset_metadata_and_weights_read_from_the_bucket(bucket, tmp_path):
    data_dir = epath.Path("gs://lab-bucket/prepared/her2_dce/x/1.0.0")
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "metadata.json").write_text(json.dumps({"preparation": {"image_size": 16}}))
    assert input_pipeline.preparation_metadata(str(data_dir))["preparation"] == \
        {"image_size": 16}
    path = "gs://lab-bucket/weights/w.safetensors"
    weights.save({"fc/kernel": np.ones((2, 3))}, path, source="torchvision", arch="resnet18")
    arrays, metadata = weights.read(path)
    np.testing.assert_array_equal(arrays["fc/kernel"], np.ones((2, 3)))
    assert metadata["arch"] == "resnet18" and path in bucket.opened
    with pytest.raises(FileNotFoundError, match="gs://lab-bucket/weights/none"):
        weights.read("gs://lab-bucket/weights/none.safetensors")


BARE_CALLS = {("os", "path"), ("os", "makedirs"), ("os", "listdir"), ("os", "remove"),
              ("os", "rename"), ("os", "walk"), ("shutil", None), ("glob", None)}


def bare_file_access(source: str) -> list[str]:
    """Calls of open(), os.path.*, os.makedirs/listdir/..., shutil.*, glob.* and any pathlib
    import in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id == "open":
            found.append(f"line {node.lineno}: open(")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if (node.value.id, node.attr) in BARE_CALLS or (node.value.id, None) in BARE_CALLS:
                found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            if any(n == "pathlib" for n in names):
                found.append(f"line {node.lineno}: import pathlib")
    return found


def test_scan_finds_bare_access():
    assert len(bare_file_access("import os, pathlib\nopen('x')\nos.path.join('a')\n"
                                "shutil.copy('a', 'b')\n")) == 4


def test_her2jax_never_opens_files_bare():
    offenders = {}
    for folder, _, files in os.walk(HER2JAX):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as handle:
                    found = bare_file_access(handle.read())
                if found:
                    offenders[os.path.relpath(path, HER2JAX)] = found
    assert not offenders, f"use etils.epath for run and data paths: {offenders}"
