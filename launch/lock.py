"""One launcher per sweep folder at a time: SWEEP_DIR/launcher.lock.

The launcher that runs or submits a sweep holds an exclusive `flock` on the lock file for as long
as it works, and writes its host, pid and start time into it. A second launcher on the same
folder (a user re-running the command while the first still runs) is refused in one line that
names the holder. The kernel releases the lock when its holder dies, SIGKILL included, so a lock
is never stale: a lock file that still names a holder but is not held was left by a launcher
that was killed, and the next launcher says so (`Held.killed`) and repairs the manifest
(`her2jax/lock.py`). Sweep folders in buckets (gs://...) have no lock.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from her2jax import lock as _lock
from her2jax.errors import UserError
from her2jax.lock import Held, alive, describe, me

__all__ = ["Held", "LOCK_FILE", "SweepBusy", "alive", "describe", "hold", "me"]

LOCK_FILE = "launcher.lock"


class SweepBusy(UserError):
    """Another launcher holds the sweep folder."""


@contextlib.contextmanager
def hold(sweep_dir: str) -> Iterator[Held]:
    """Holds SWEEP_DIR/launcher.lock for the `with` block, or raises SweepBusy naming the
    launcher that holds it."""
    if "://" in sweep_dir:
        yield Held(None)
        return
    os.makedirs(sweep_dir, exist_ok=True)
    path = os.path.join(sweep_dir, LOCK_FILE)

    def busy(holder):
        who = describe(holder) if holder else "a launcher starting up"
        return SweepBusy(f"{sweep_dir} is being run by another launcher ({who}; {path}): "
                         "wait for it to finish, or stop it, then launch again")

    with _lock.hold(path, busy) as held:
        yield held
