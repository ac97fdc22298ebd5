"""A real one-node SLURM cluster for the tests: munged, slurmctld and slurmd started on this
machine from a minimal configuration in a temporary folder, and stopped afterwards.

The same steps by hand are in README.md ("Trying the SLURM backend on one machine"). It needs
root and Debian's `slurm-wlm` and `munge` packages (`.ci/run` installs them when absent). Where
they are missing the tests skip with the reason, unless HER2JAX_REQUIRE_SLURM=1 (set by
`.ci/run`) turns the skip into a failure.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo")
REQUIRE = "HER2JAX_REQUIRE_SLURM"


def unavailable() -> str | None:
    """Why a cluster cannot be started here, or None."""
    missing = [name for name in DAEMONS if not shutil.which(name)]
    if missing:
        return (f"SLURM is not installed ({', '.join(missing)} missing): apt-get install "
                f"slurm-wlm munge")
    if os.geteuid() != 0:
        return "starting slurmd and munged needs root"
    return None


def skip_or_fail(reason: str) -> None:
    if os.environ.get(REQUIRE) == "1":
        pytest.fail(f"{REQUIRE}=1 but {reason}")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def configuration(folder: str, host: str, cpus: int) -> str:
    """slurm.conf: this host the only node (its cores, no GPUs), one partition `debug`,
    everything the daemons keep in `folder`, job records kept an hour for `scontrol`."""
    return "\n".join([
        "ClusterName=her2jaxtest", f"SlurmctldHost={host}", "SlurmUser=root",
        "AuthType=auth/munge", f"AuthInfo=socket={folder}/munge/socket", "CredType=cred/munge",
        f"StateSaveLocation={folder}/state", f"SlurmdSpoolDir={folder}/spool",
        f"SlurmctldPidFile={folder}/slurmctld.pid", f"SlurmdPidFile={folder}/slurmd.pid",
        f"SlurmctldLogFile={folder}/slurmctld.log", f"SlurmdLogFile={folder}/slurmd.log",
        f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "MpiDefault=none",
        "ReturnToService=2", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none", "MinJobAge=3600",
        f"NodeName={host} CPUs={cpus} State=UNKNOWN",
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""])


class Cluster:
    """Started by `start()`, stopped by `stop()`; `environ` is what SLURM's commands need."""

    def __init__(self, folder: str):
        self.folder = folder
        self.host = socket.gethostname().split(".")[0]
        self.conf = os.path.join(folder, "slurm.conf")
        self.environ = dict(os.environ, SLURM_CONF=self.conf)

    def start(self, timeout: float = 60.0) -> None:
        munge = os.path.join(self.folder, "munge")
        for name in ("state", "spool"):
            os.makedirs(os.path.join(self.folder, name))
        os.makedirs(munge, mode=0o700)
        with open(self.conf, "w") as handle:
            handle.write(configuration(self.folder, self.host, os.cpu_count() or 1))
        key = os.path.join(munge, "munge.key")
        self._run(["mungekey", "--create", f"--keyfile={key}"])
        self._run(["munged", "--force", f"--socket={munge}/socket", f"--key-file={key}",
                   f"--log-file={munge}/munged.log", f"--pid-file={munge}/munged.pid",
                   f"--seed-file={munge}/munged.seed"])
        self._run(["slurmctld", "-f", self.conf])
        self._run(["slurmd", "-f", self.conf])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.command(["sinfo", "-h", "-o", "%T"], check=False).strip()
            if state == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"the SLURM node did not come up (sinfo: {state!r})\n" + self.logs())

    def stop(self) -> None:
        """Cancels every job, waits for them to end, then stops the daemons."""
        if os.path.exists(self.conf):
            self.command(["scancel", "--full", "--user=root"], check=False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.command(
                    ["squeue", "-h"], check=False).strip():
                time.sleep(0.5)
        for pid_file in ("slurmd.pid", "slurmctld.pid", "munge/munged.pid"):
            path = os.path.join(self.folder, pid_file)
            if not os.path.exists(path):
                continue
            pid = int(open(path).read().strip() or 0)
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)

    def command(self, argv: list[str], check: bool = True) -> str:
        result = subprocess.run(argv, env=self.environ, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        if check and result.returncode:
            raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}: {result.stdout}")
        return result.stdout

    def _run(self, argv: list[str]) -> None:
        self.command(argv)

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as {key: value} (the first record of an array task)."""
        text = self.command(["scontrol", "show", "job", "--oneliner", job_id])
        fields = {}
        for item in text.splitlines()[0].split():
            key, _, value = item.partition("=")
            fields[key] = value
        return fields

    def wait(self, job_ids: list[str], timeout: float = 600.0) -> None:
        """Until none of the jobs (array tasks included) is pending or running."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            listed = self.command(["squeue", "-h", "-o", "%i", "-j", ",".join(job_ids)],
                                  check=False).split()
            if not listed:
                return
            time.sleep(1)
        raise TimeoutError(f"jobs {job_ids} still queued or running after {timeout} s\n"
                           + self.command(["squeue"], check=False) + self.logs())

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = os.path.join(self.folder, name)
            if os.path.exists(path):
                parts.append(f"---- {name}\n" + "".join(open(path).readlines()[-30:]))
        return "\n".join(parts)
