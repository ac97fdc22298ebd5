"""Exclusive locks on a local file that name their holder (`flock`, released by the kernel when the
holder dies, SIGKILL included, so a lock is never stale).

The holder writes its host, pid and start time into the lock file. A second process is refused
with the holder named. A lock file that still names a holder but is not held was left by a
process that was killed: the next holder is told (`Held.killed`) and can repair what the killed
one left. Used for sweep folders (`launch/lock.py`) and datasets being prepared
(`data_prep.prepare`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

from etils import epath

from her2jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Held:
    """The lock, held; `killed`: what the file said about a holder that died holding it."""
    path: str | None
    killed: dict[str, Any] | None = None


def me() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds")}


def describe(holder: dict[str, Any] | None) -> str:
    """'pid 12 on host, since 2026-...' for a lock file's content."""
    if not holder:
        return "a process starting up"
    return f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('started')}"


@contextlib.contextmanager
def hold(path: str, busy: Callable[[dict[str, Any] | None], UserError], *,
         remove: bool = False) -> Iterator[Held]:
    """Holds the lock file `path` for the `with` block, or raises `busy(holder)`.

    remove: the file is deleted on release in good order (a killed holder's file stays, so the
    next holder learns of it); a process that opened the file just before it was deleted sees
    that its file is no longer the one at `path` and starts over."""
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = _read(descriptor)
            os.close(descriptor)
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise busy(holder) from None
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(descriptor).st_ino:
            break
        os.close(descriptor)                  # deleted by its last holder meanwhile: again
    try:
        killed = _read(descriptor)
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, json.dumps(me()).encode(), 0)
        os.fsync(descriptor)
        try:
            yield Held(path, killed)
        finally:
            if remove:
                epath.Path(path).unlink(missing_ok=True)
            os.ftruncate(descriptor, 0)      # an empty file: released in good order
            fcntl.flock(descriptor, fcntl.LOCK_UN)
    finally:
        os.close(descriptor)


def _read(descriptor: int) -> dict[str, Any] | None:
    data = os.pread(descriptor, 4096, 0)
    try:
        value = json.loads(data) if data.strip() else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def alive(pid: int, marker: str | None = None) -> bool:
    """Whether process `pid` runs on this host (not a zombie, and, where /proc tells, its command
    line holds `marker`: a reused pid is another process)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        if epath.Path(f"/proc/{pid}/stat").read_bytes().rpartition(b")")[2].split()[0] == b"Z":
            return False
    except (OSError, IndexError):
        pass
    if marker is None:
        return True
    try:
        return marker.encode() in epath.Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
