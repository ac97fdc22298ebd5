"""Result files written whole or not at all.

Every file a command writes for people or later commands to read (metrics.json, predictions.csv,
report.md, config.json, leaderboards, dataset reports, figures, converted weights) goes through
`write_text`, `write_json` or `write_bytes`: on a local disk the bytes go to a temporary file
beside the target, are flushed to disk and renamed over it, so a command stopped mid-write
leaves the previous file or none, never half of one, and no temporary file survives a failed
write. Object-store paths (gs://...)
are written whole by one upload, which the store makes visible at once.
"""
from __future__ import annotations

import json
import os
import secrets
from typing import Any

from etils import epath

from her2jax.errors import InvalidSetting


def write_text(path: str | os.PathLike, text: str) -> None:
    """`text` (UTF-8) into `path` atomically (module docstring)."""
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """`data` into `path` atomically (module docstring), with the permissions a plain write
    would give (the umask applies)."""
    if "://" in str(path):
        epath.Path(path).write_bytes(data)
        return
    path = epath.Path(path)
    temporary = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    descriptor = os.open(os.fspath(temporary), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename is None:    # a failed write: name it
            raise OSError(error.errno, error.strerror or str(error), os.fspath(path)) from None
        raise


def write_json(path: str | os.PathLike, value: Any, **options: Any) -> None:
    """`json.dumps(value, **options)` into `path` atomically, with a final newline."""
    write_text(path, json.dumps(value, **options) + "\n")


def check_folder(path: str | os.PathLike, what: str) -> None:
    """Refuses, in one line naming the path, a local folder that cannot be created or written
    (a file on its way, no permission), before a command reads or writes anything."""
    if "://" in str(path):
        return
    probe = epath.Path(path).expanduser().resolve()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise InvalidSetting(f"{what} {path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InvalidSetting(f"{what} {path}: no permission to write in {probe}")
