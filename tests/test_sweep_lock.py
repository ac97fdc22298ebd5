"""One launcher per sweep folder (`launch.lock`), tested with real launcher processes: a second
launcher is refused naming the first; a launcher killed with SIGKILL leaves a lock that is not
held and runs marked running, which the next launcher repairs, refusing while an orphaned run
still trains. The runs' interpreter is a stand-in script (`--python`) that sleeps like a long
run, so no training is needed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from launch import lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# preparing data succeeds at once; a run sleeps (its own session, as the launcher starts it),
# or ends at once with status 3 once QUICK exists
STAND_IN = """#!/bin/bash
case "$*" in *data_prep*) exit 0 ;; esac
[ -e "{quick}" ] && exit 3
exec sleep 120
"""


def launcher(tmp_path, python: str) -> list[str]:
    return [sys.executable, "-m", "launch.sweep", "--sweep", "configs/sweeps/lr_search.py:2",
            "--backend", "local", "--pack", "off", "--source", str(tmp_path / "cohort"),
            "--sweep_dir", str(tmp_path / "sweep"), "--python", python,
            "--set", "init.pretrained="]


def manifest(tmp_path) -> dict:
    return json.loads((tmp_path / "sweep" / "manifest.json").read_text())


def test_a_second_launcher_is_refused_and_a_killed_ones_manifest_is_repaired(tmp_path):
    python = tmp_path / "python"
    python.write_text(STAND_IN.format(quick=tmp_path / "quick"))
    python.chmod(0o755)
    env = dict(os.environ, PYTHONPATH=ROOT)
    first = subprocess.Popen(launcher(tmp_path, str(python)), cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    orphan = None
    try:
        deadline = time.monotonic() + 120
        while True:        # until the first run is started and recorded
            path = tmp_path / "sweep" / "manifest.json"
            entries = json.loads(path.read_text())["runs"] if path.exists() else []
            running = [e for e in entries if e["status"] == "running" and e.get("pid")]
            if running:
                break
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.2)
        orphan = running[0]["pid"]
        second = subprocess.run(launcher(tmp_path, str(python)), cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 1
        error = second.stderr.strip().splitlines()[-1]
        assert error.startswith(f"error: {tmp_path / 'sweep'} is being run by another "
                                f"launcher (pid {first.pid} on ")
        # SIGKILL: no handler runs; the run it started (its own session) trains on
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert lock.alive(orphan)
        third = subprocess.run(launcher(tmp_path, str(python)), cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=120)
        assert third.returncode == 1
        assert third.stderr.strip().splitlines()[-1] == (
            f"error: run {running[0]['name']} is still being trained by process {orphan} on "
            "this host, though the launcher that started it is gone: stop it (kill -TERM -- "
            f"-{orphan}, its process group; it writes a checkpoint) and launch again")
        assert f"the launcher that ran this sweep last (pid {first.pid} on " in third.stdout
        assert manifest(tmp_path)["runs"][0]["status"] == "running"   # nothing written
        os.killpg(orphan, signal.SIGKILL)
        _wait_gone(orphan)
        (tmp_path / "quick").write_text("")
        fourth = subprocess.run(launcher(tmp_path, str(python)), cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=120)
        assert (f"stopped: {running[0]['name']} (marked running by a launcher that is gone"
                in fourth.stdout)
        # the repaired runs ran again (the stand-in now fails at once): the manifest says so
        assert [e["status"] for e in manifest(tmp_path)["runs"]] == ["failed", "failed"]
        assert (tmp_path / "sweep" / lock.LOCK_FILE).read_text() == ""   # released in order
    finally:
        if first.poll() is None:
            first.kill()
        if orphan and lock.alive(orphan):
            os.killpg(orphan, signal.SIGKILL)


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 30
    while lock.alive(pid):
        assert time.monotonic() < deadline, f"process {pid} did not end"
        time.sleep(0.1)


def test_the_lock_is_held_by_one_holder_and_released_by_the_kernel_when_it_dies(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom launch import lock\n"
         "with lock.hold(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(120)\n",
         str(tmp_path)], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(lock.SweepBusy, match=f"pid {holder.pid} on "):
            with lock.hold(str(tmp_path)):
                pass
        holder.kill()
        holder.wait()
        with lock.hold(str(tmp_path)) as held:
            assert held.killed["pid"] == holder.pid
        with lock.hold(str(tmp_path)) as held:           # released in order: nothing to say
            assert held.killed is None
    finally:
        holder.kill()
