"""Stopping a preparation, and a disk that refuses its writes, with real processes.

A preparation stopped by SIGTERM or Ctrl-C ends its worker processes and multiprocessing's helper
within seconds and leaves nothing in --data_dir; one killed with SIGKILL takes its workers with it
(they die with their parent) and the next preparation removes the unfinished folder it left,
saying so; a second preparation of the same dataset is refused while the first runs; a write the
file system refuses (here a file size limit, which fails the write as a full disk does) ends in
one line naming the file, with nothing left that looks finished.

The preparations that must be busy when they are stopped read their images through a stand-in
NIfTI reader that hangs like a stalled network file system (tests/standin/slow_reader).
"""
from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import time

import pytest

from conftest import prepare_args, write_cohort
from data_prep import prepare
from her2jax import files
from her2jax.lock import alive

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLOW_READER = os.path.join(ROOT, "tests", "standin", "slow_reader")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("stop") / "cohort")
    write_cohort(folder, patients=6)
    return folder


def start(source: str, data_dir: str, *, slow: bool, workers: int = 2,
          preexec_fn=None) -> subprocess.Popen:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0")
    if slow:
        env["PYTHONPATH"] = os.pathsep.join([SLOW_READER, env.get("PYTHONPATH", "")])
        env["STALLED_DIR"] = data_dir + ".stalled"
        os.makedirs(env["STALLED_DIR"])
    args = [*prepare_args(source, data_dir), "--workers", str(workers)]
    return subprocess.Popen([sys.executable, "-m", "data_prep.prepare", *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=preexec_fn)


def descendants(pid: int) -> list[int]:
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as handle:
                    parents[int(name)] = int(handle.read().rpartition(b")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def wait_busy(process: subprocess.Popen, data_dir: str) -> list[int]:
    """Waits until both workers are inside a patient (stalled in a read); returns the
    preparation's descendants (workers and multiprocessing's resource tracker)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        stalled = {int(name) for name in os.listdir(data_dir + ".stalled")}
        helpers = descendants(process.pid)
        if len(stalled) == 2 and stalled <= set(helpers):
            return helpers
        time.sleep(0.2)
    raise AssertionError("the preparation did not get busy")


def end_group(process: subprocess.Popen) -> None:
    """Kills whatever is left of the preparation's process group, orphans included, whatever
    the test found."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.communicate()


def wait_gone(pids: list[int], seconds: float = 30) -> list[int]:
    deadline = time.monotonic() + seconds
    while [pid for pid in pids if alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.1)
    return [pid for pid in pids if alive(pid)]


def leftovers(data_dir: str) -> list[str]:
    return [os.path.join(path, name) for path, folders, names in os.walk(data_dir)
            for name in folders + names]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_ends_the_workers_and_leaves_nothing_and_a_second_preparation_waits(
        source, tmp_path, capsys):
    data_dir = str(tmp_path / "out")
    process = start(source, data_dir, slow=True)
    try:
        helpers = wait_busy(process, data_dir)
        assert len(helpers) >= 2
        # the same dataset, while the first prepares it: refused, naming the first
        assert prepare.main(prepare_args(source, data_dir)) == 1
        busy = capsys.readouterr().err.strip()
        assert busy.startswith("error: ") and "is being prepared by another process (pid " \
            f"{process.pid} on " in busy and "\n" not in busy
        process.send_signal(signal.SIGTERM)                # the parent alone, as `kill` does
        _, err = process.communicate(timeout=60)
    finally:
        end_group(process)
    assert process.returncode == 128 + signal.SIGTERM
    assert err.strip().splitlines()[-1] == (
        "stopped by SIGTERM: the worker processes ended and the unfinished dataset was removed "
        f"from {data_dir}")
    assert "Traceback" not in err
    assert wait_gone(helpers) == []
    assert not os.path.exists(data_dir), leftovers(data_dir)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; prctl")
def test_a_killed_preparation_takes_its_workers_and_the_next_one_removes_what_it_left(
        source, tmp_path, capsys):
    data_dir = str(tmp_path / "out")
    process = start(source, data_dir, slow=True)
    try:
        helpers = wait_busy(process, data_dir)
        process.kill()                                     # SIGKILL: no clean-up of its own
        process.communicate(timeout=60)
        assert wait_gone(helpers) == []                    # the workers died with their parent
    finally:
        end_group(process)
    unfinished = [path for path in leftovers(data_dir)
                  if os.path.basename(path).startswith("incomplete.")]
    assert len(unfinished) == 1

    assert prepare.main(prepare_args(source, data_dir)) == 0
    err = capsys.readouterr().err
    assert (f"removed 1 unfinished dataset folder(s) left in {os.path.dirname(unfinished[0])} "
            f"by a preparation that was stopped (pid {process.pid} on ") in err
    assert os.path.basename(unfinished[0]) in err
    assert not [path for path in leftovers(data_dir) if "incomplete." in path
                or path.endswith(prepare.LOCK_FILE)]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP])
def test_ctrl_c_and_hangup_stop_like_sigterm(signum):
    """Every stop signal becomes `Stopped` where the main thread is, and a second one while
    stopping is ignored, so the clean-up finishes."""
    before = signal.getsignal(signum)
    with pytest.raises(prepare.Stopped) as stopped:
        with prepare._stops_cleanly():
            os.kill(os.getpid(), signum)
            time.sleep(5)
    assert stopped.value.signum == signum
    assert signal.getsignal(signum) == before                     # restored after the block


def limit_file_size(limit: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)       # a failed write, not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


def test_a_refused_write_ends_in_one_line_with_nothing_left(source, tmp_path):
    """TFRecord shards over 8 KB fail as on a full disk: the error names the shard."""
    data_dir = str(tmp_path / "out")
    process = start(source, data_dir, slow=False, workers=1,
                    preexec_fn=lambda: limit_file_size(8192))
    out, err = process.communicate(timeout=300)
    assert process.returncode == 1, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: could not write the dataset into {data_dir}: File too "
                               "large (")
    assert ".tfrecord-" in lines[0] and "nothing was kept" in lines[0]
    assert not os.path.exists(data_dir), leftovers(data_dir)


def test_a_refused_result_write_names_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "report.md"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(OSError) as refused:
            files.write_text(target, "x" * 10_000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert refused.value.filename == str(target)
    assert os.listdir(tmp_path) == []
