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
import math
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


# why a figure is undefined, written beside it as "<key>_undefined" (by the figure's definition)
UNDEFINED = {
    "auc": "one class only", "auc_ci_low": "one class only", "auc_ci_high": "one class only",
    "slice_auc": "one class only", "balanced_accuracy": "one class only",
    "sensitivity": "no positive cases", "specificity": "no negative cases",
    "ppv": "no positive predictions", "npv": "no negative predictions",
    "f1": "no positive cases and no positive predictions",
    "brier": "no cases", "expected_calibration_error": "no cases",
}


def strict(value: Any) -> Any:
    """`value` as strict JSON can hold it: every NaN or infinite number (Python or numpy) becomes
    None (null), with `"<key>_undefined": reason` beside it in its object when the key is a
    figure of UNDEFINED; numpy scalars and arrays become Python numbers and lists."""
    if isinstance(value, dict):
        out: dict[Any, Any] = {}
        for key, item in value.items():
            out[key] = strict(item)
            if out[key] is None and _non_finite(item) and key in UNDEFINED \
                    and f"{key}_undefined" not in value:
                out[f"{key}_undefined"] = UNDEFINED[key]
        return out
    if isinstance(value, (list, tuple)):
        return [strict(item) for item in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):    # numpy
        return strict(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _non_finite(value: Any) -> bool:
    try:
        return not math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def json_text(value: Any, **options: Any) -> str:
    """Strict JSON (`strict`; never NaN or Infinity, which most JSON readers refuse)."""
    options.pop("allow_nan", None)
    return json.dumps(strict(value), allow_nan=False, **options)


def write_json(path: str | os.PathLike, value: Any, **options: Any) -> None:
    """`value` as strict JSON (`json_text`) into `path` atomically, with a final newline. Every
    JSON file the project writes goes through here or `json_text`."""
    write_text(path, json_text(value, **options) + "\n")


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
