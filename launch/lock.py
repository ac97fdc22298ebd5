"""One launcher per sweep folder at a time: SWEEP_DIR/launcher.lock.

The launcher that runs or submits a sweep holds an exclusive `flock` on the lock file for as long
as it works, and writes its host, pid and start time into it. A second launcher on the same
folder (a user re-running the command while the first still runs) is refused in one line that
names the holder. The kernel releases the lock when its holder dies, SIGKILL included, so a lock
is never stale: a lock file that still names a holder but is not held was left by a launcher
that was killed, and the next launcher says so (`Held.killed`) and repairs the manifest. Sweep
folders in buckets (gs://...) have no lock.
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
from collections.abc import Iterator
from typing import Any

from her2jax.errors import UserError

LOCK_FILE = "launcher.lock"


class SweepBusy(UserError):
    """Another launcher holds the sweep folder."""


@dataclasses.dataclass(frozen=True)
class Held:
    """The lock, held; `killed`: what the file said about a holder that died holding it."""
    path: str | None
    killed: dict[str, Any] | None = None


def me() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds")}


@contextlib.contextmanager
def hold(sweep_dir: str) -> Iterator[Held]:
    """Holds SWEEP_DIR/launcher.lock for the `with` block, or raises SweepBusy naming the
    launcher that holds it."""
    if "://" in sweep_dir:
        yield Held(None)
        return
    os.makedirs(sweep_dir, exist_ok=True)
    path = os.path.join(sweep_dir, LOCK_FILE)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = _read(descriptor)
            who = (f"pid {holder.get('pid')} on {holder.get('host')}, since "
                   f"{holder.get('started')}" if holder else "a launcher starting up")
            raise SweepBusy(f"{sweep_dir} is being run by another launcher ({who}; {path}): "
                            "wait for it to finish, or stop it, then launch again") from None
        killed = _read(descriptor)
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, json.dumps(me()).encode(), 0)
        os.fsync(descriptor)
        try:
            yield Held(path, killed)
        finally:
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
        with open(f"/proc/{pid}/stat", "rb") as handle:
            if handle.read().rpartition(b")")[2].split()[0] == b"Z":
                return False
    except (OSError, IndexError):
        pass
    if marker is None:
        return True
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return marker.encode() in handle.read()
    except OSError:
        return True
