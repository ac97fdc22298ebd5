"""Launch a sweep: `python -m launch.sweep --sweep configs/sweeps/NAME.py[:ARG] --backend
local|slurm|tpu [--dry_run] [--only PATTERN] [--source COHORT] [--sweep_dir DIR]`.

Every run gets a stable name (`launch.spec`) and the work directory SWEEP_DIR/runs/NAME; the
data variants the runs need are prepared once, into SWEEP_DIR/data, before those runs. A run
whose test evaluation exists is finished and skipped; a run stopped by SIGTERM or Ctrl-C (exit
code 143 or 130, its checkpoint written) is `stopped` and resumed by the next launch; a failed run
is reported and retried with `--retry_failed` (training resumes from its latest checkpoint by
itself). Ctrl-C or SIGTERM to the local launcher passes SIGTERM on to every run it started (each
writes its checkpoint and is marked `stopped`). SWEEP_DIR/manifest.json records every run's
commands, config, status and timings; `python -m launch.collect SWEEP_DIR` turns the finished
runs into the leaderboard.

Backends:
    local   runs here, one after the other, or `--parallel N` at a time, each with its own
            devices (`--devices 0,1,2,3`: CUDA_VISIBLE_DEVICES round-robin) or, on CPU, its
            own share of threads
    slurm   writes SWEEP_DIR/slurm/prepare.sbatch and an array script, one task per run not
            finished yet (its commands as bash arrays; training as a job step, srun, so that
            `scancel --signal=TERM` makes it write its checkpoint; multi-node runs, `--nodes K`,
            start one process per node and get the jax.distributed environment from SLURM), and
            submits them (the array after the preparation, left out when the data is there);
            `--dry_run` prints them
    tpu     the gcloud commands for a Cloud TPU VM: create (or `--queued` spot capacity through
            queued resources), copy the last commit of `--repo`, install, prepare, and run each
            run on every worker (`--worker=all`, `--multihost=on`), `--delete` the VM at the end;
            data, run folders and the manifest (`gcloud storage cp`) in the bucket of
            `--sweep_dir gs://BUCKET/...`; the cohort (`--source`, gs:// or local) is copied to
            worker 0, prepared there and the data copied into the bucket; `--dry_run` prints them
`--set key=value` overrides a config key in every run (e.g. `--set total_steps=100`); a key
that a run's config lacks (from --set or the sweep file) is refused before anything runs, dry
runs included (exit code 2).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fnmatch
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from etils import epath

from her2jax import files
from her2jax.errors import InvalidSetting, MissingInput, ToolFailed, UserError
from her2jax.run_folder import RunFolder
from launch import lock, packs, spec
from launch.spec import Run, Sweep

BACKENDS = ("local", "slurm", "tpu")
FINISHED, FAILED, PENDING, RUNNING, SKIPPED = "finished", "failed", "pending", "running", "skipped"
STOPPED = "stopped"           # SIGTERM / Ctrl-C: a checkpoint was written; a relaunch resumes it
STOP_CODES = (128 + 15, 128 + 2, -15, -2)


# ---------------------------------------------------------------- loading a sweep

def load_sweep(spec: str) -> Sweep:
    """`configs/sweeps/attention.py[:arg]` -> the Sweep its get_sweep(arg) returns."""
    from configs.common import load_file

    path, _, arg = spec.partition(":")
    module = load_file(path, "sweep")
    if not hasattr(module, "get_sweep"):
        raise InvalidSetting(f"{path} has no get_sweep(arg)")
    sweep = module.get_sweep(arg or None)
    if not isinstance(sweep, Sweep):
        raise InvalidSetting(f"{path}: get_sweep must return launch.spec.Sweep")
    return sweep


def parse_value(text: str) -> Any:
    """'1e-3' -> 0.001, 'true' -> True, '[1,2]' -> [1, 2], anything else stays text."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return json.loads(text)
    except ValueError:
        return text


def unknown_override(runs: Sequence[Run]) -> str | None:
    """What is wrong with the first override key a run's config lacks; None when all exist."""
    from configs import common

    configs: dict[str, Any] = {}
    for run in runs:
        if run.config not in configs:
            configs[run.config] = common.load(run.config)
        for key, _ in run.overrides:
            problem = common.unknown_key(configs[run.config], key)
            if problem:
                return f"{key}: {problem} (run {run.name}, {run.config})"
    return None


def with_settings(run: Run, settings: dict[str, Any]) -> Run:
    if not settings:
        return run
    overrides = dict(run.overrides)
    overrides.update(settings)
    return Run(config=run.config, overrides=tuple(sorted(overrides.items())), seed=run.seed,
               data=run.data)


class MissingWeights(MissingInput):
    """Runs of the sweep load weight files that are not there."""


def check_weights(runs: Sequence[Run], root: str, *, dry_run: bool) -> None:
    """Refuses a sweep whose runs load weight files (`init.pretrained`) that are missing, before
    anything is prepared or trained, naming the files and the ways on; a dry run says so and
    goes on."""
    missing: dict[str, list[str]] = {}
    for run in runs:
        path = run.settings.get("init.pretrained")
        if path and "://" not in str(path) and \
                not os.path.isfile(os.path.join(root, os.path.expanduser(str(path)))):
            missing.setdefault(str(path), []).append(run.name)
    if not missing:
        return
    listed = ", ".join(f"{path} ({len(names)} runs)" for path, names in missing.items())
    advice = ("convert them first (python -m her2jax.convert --source torchvision|timm|hf "
              "--arch MODEL IN WEIGHTS_DIR/MODEL.safetensors; README 'ImageNet weights'), give "
              "--weights_dir DIR where they are, or train from scratch with "
              "--set init.pretrained=")
    if dry_run:
        print(f"note: the runs load ImageNet weights that are not there yet: {listed}; {advice}",
              file=sys.stderr)
        return
    raise MissingWeights(f"the runs load ImageNet weights that are not there: {listed}; "
                         f"{advice}")


# ---------------------------------------------------------------- commands

def _flag_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "(" + ",".join(str(v) for v in value) + (",)" if len(value) == 1 else ")")
    return str(value)


def train_command(run: Run, workdir: str, data_dir: str | None, python: str = "python",
                  extra: Sequence[str] = ()) -> list[str]:
    command = [python, "-m", "her2jax.main", "--config", run.config, "--workdir", workdir,
               f"--config.seed={run.seed}"]
    if data_dir:
        command.append(f"--config.data_dir={data_dir}")
    command += [f"--config.{key}={_flag_value(value)}" for key, value in run.overrides]
    return command + list(extra)


def evaluate_command(workdir: str | Sequence[str], python: str = "python") -> list[str]:
    """The test evaluation of a run, or of several in one process (a pack's members)."""
    workdirs = [workdir] if isinstance(workdir, str) else list(workdir)
    return [python, "-m", "her2jax.evaluate", "--workdir", *workdirs, "--split", "test",
            "--quiet"]


def prepare_command(source: str, data_root: str, options: dict[str, Any],
                    python: str = "python") -> list[str]:
    command = [python, "-m", "data_prep.prepare", "--source", source, "--data_dir", data_root,
               "--quiet"]
    for key, value in sorted(options.items()):
        if isinstance(value, bool):
            if value:
                command.append(f"--{key}")
        elif isinstance(value, (list, tuple)):
            command += [f"--{key}", ",".join(str(v) for v in value)]
        else:
            command += [f"--{key}", str(value)]
    return command


def dataset_path(data_root: str, options: dict[str, Any]) -> str:
    """Where `data_prep.prepare` writes a variant: DATA_ROOT/her2_dce/<config name>/<version>
    (computed the way the builder names it, so scripts can refer to it before it exists)."""
    from data_prep.params import PrepParams

    return PrepParams.from_dict(options).dataset_path(data_root)


# ---------------------------------------------------------------- the plan

def _names_already_used(runs: list[Run], sweep_dir: str) -> list[Run]:
    """A sweep folder started before readable names keeps its runs' names: a run its manifest
    lists under the full name (`Run.full_group`) and not under the readable one keeps the full
    name, so its folder, checkpoints and results are found."""
    if "://" in sweep_dir:
        return runs
    manifest = read_manifest(sweep_dir)
    if not manifest:
        return runs
    known = {entry.get("name") for entry in manifest.get("runs", [])}
    return [dataclasses.replace(run, label=None)
            if run.name not in known and f"{run.full_group}-s{run.seed}" in known else run
            for run in runs]


class Plan:
    """The runs of a sweep with their folders, commands and manifest entries."""

    def __init__(self, sweep: Sweep, sweep_dir: str, *, source: str | None,
                 only: str | None = None, settings: dict[str, Any] | None = None,
                 python: str = "python", data_root: str | None = None,
                 extra_train: Sequence[str] = (), pack: int | str | None = None):
        self.sweep = sweep
        self.pack = pack
        self.sizes: dict[Any, int] = {}     # --pack auto: members per pack_key, measured
        if pack is not None:
            packs.check_settings(settings or {})
        self.sweep_dir = sweep_dir.rstrip("/")
        self.source = source
        self.python = python
        self.data_root = data_root or f"{self.sweep_dir}/data"
        for key in settings or {}:
            values = {repr(run.settings[key]) for run in sweep.runs if key in run.settings}
            if len(values) > 1:
                raise InvalidSetting(f"--set {key}: sweep {sweep.name} varies this key "
                                     f"({', '.join(sorted(values))}); setting it would make its "
                                     f"runs one and the same (narrow the sweep with --only "
                                     f"instead)")
        runs = spec.readable_names([with_settings(run, settings or {}) for run in sweep.runs])
        runs = _names_already_used(runs, self.sweep_dir)
        if only:
            runs = [run for run in runs if fnmatch.fnmatch(run.name, only)
                    or fnmatch.fnmatch(run.name, f"*{only}*")]
        self.runs = runs
        variants = sorted({run.data for run in runs if run.data})
        if variants and not source:
            raise InvalidSetting(f"sweep {sweep.name} prepares data variants {variants}: give "
                                 f"--source (the cohort to prepare)")
        self.datasets = {v: dataset_path(self.data_root, sweep.data[v]) for v in variants}
        self.extra_train = list(extra_train)

    def workdir(self, run: Run) -> str:
        return f"{self.sweep_dir}/runs/{run.name}"

    def commands(self, run: Run) -> dict[str, list[str]]:
        """The run's commands when it trains alone (in a packed sweep: a pack of one)."""
        return self.job_commands(packs.Job((run,)))

    def job_commands(self, job: packs.Job) -> dict[str, list[str]]:
        """{"train": the job's training command, "evaluate": its runs' test evaluation (one
        process for all the members of a pack)}."""
        first = job.runs[0]
        extra = list(self.extra_train)
        if self.pack is not None:
            extra += packs.device_flags()
            extra += [packs.member_flag(run, self.workdir(run)) for run in job.runs[1:]]
        train = train_command(first, self.workdir(first), self.datasets.get(first.data),
                              self.python, extra)
        return {"train": train, "evaluate": evaluate_command(
            [self.workdir(run) for run in job.runs], self.python)}

    def jobs(self, runs: Sequence[Run], read_steps: bool = True) -> list[packs.Job]:
        """`runs` as the processes that train them: packs of at most --pack runs (members of a
        pack stopped at one checkpoint step, read from the run folders unless `read_steps` is
        False: the TPU backend's bucket is the workers', not the launcher's), or one run each."""
        def measured(run: Run) -> int:     # `measure_packs`'s; before that, whole groups
            return self.sizes.get(packs.pack_key(run), len(runs))

        return packs.group(runs, measured if self.pack == packs.AUTO else self.pack,
                           (lambda run: latest_step(self.workdir(run)))
                           if read_steps else (lambda run: 0))

    def measure_packs(self, runs: Sequence[Run], out=None) -> None:
        """--pack auto: for each group of `runs` that may share packs, as many members as fit in
        one local device's free memory beside the resident splits, from the compiled packed
        step's memory analysis (`her2jax.training.pack_memory`); the data must be prepared."""
        import jax

        from configs import common
        from her2jax.data import records, resident
        from her2jax.training import pack_memory

        free = resident.free_bytes(jax.local_devices()[0])
        groups: dict[Any, list[Run]] = {}
        for run in runs:
            groups.setdefault(packs.pack_key(run), []).append(run)
        for key, members in groups.items():
            first = members[0]
            data_dir = self.datasets.get(first.data)
            config = common.load(first.config)
            config.update_from_flattened_dict({**dict(first.overrides), "seed": first.seed,
                                               **packs.DEVICE_SETTINGS,
                                               **({"data_dir": data_dir} if data_dir else {})})
            image_size = records.preparation_metadata(config.data_dir)["preparation"][
                "image_size"]
            data = sum(resident.split_bytes(config.data_dir, split)
                       for split in (config.train_split, config.eval_split))
            self.sizes[key] = pack_memory.pack_size(config, image_size, free, data,
                                                    limit=len(members))
            print(f"pack auto: {self.sizes[key]} of {len(members)} runs like {first.name} "
                  f"per pack ({free / 2**30:.1f} GiB free, data {data / 2**20:.1f} MiB)",
                  file=out or sys.stdout, flush=True)

    def prepare_commands(self) -> dict[str, list[str]]:
        return {variant: prepare_command(self.source, self.data_root, self.sweep.data[variant],
                                         self.python) for variant in self.datasets}

    def manifest(self, previous: dict[str, Any] | None = None) -> dict[str, Any]:
        old = {r["name"]: r for r in (previous or {}).get("runs", [])}
        runs = []
        for run in self.runs:
            entry = {"name": run.name, "group": run.group, "config": run.config,
                     "overrides": dict(run.overrides), "seed": run.seed, "data": run.data,
                     "data_dir": self.datasets.get(run.data), "workdir": self.workdir(run),
                     "commands": {k: shlex.join(v) for k, v in self.commands(run).items()},
                     "status": PENDING}
            for key in ("status", "started", "finished", "seconds", "returncode", "log", "pid",
                        "host", "repaired"):
                if key in old.get(run.name, {}):
                    entry[key] = old[run.name][key]
            runs.append(entry)
        return {"sweep": self.sweep.name, "description": self.sweep.description,
                "sweep_dir": self.sweep_dir, "source": self.source,
                "datasets": self.datasets, "pivot": list(self.sweep.pivot or []) or None,
                "runs": runs}


def read_manifest(sweep_dir: str) -> dict[str, Any] | None:
    path = epath.Path(sweep_dir) / "manifest.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def write_manifest(sweep_dir: str, manifest: dict[str, Any]) -> None:
    folder = epath.Path(sweep_dir)
    folder.mkdir(parents=True, exist_ok=True)
    manifest["updated"] = _now()
    files.write_json(folder / "manifest.json", manifest, indent=2, default=str)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def is_finished(workdir: str) -> bool:
    return RunFolder(workdir).evaluated("test")


def latest_step(workdir: str) -> int:
    """The step of the run's latest committed checkpoint (0: none)."""
    return (RunFolder(workdir).steps() or [0])[-1]


def job_script(commands: dict[str, list[str]]) -> str:
    """One bash line: train, then evaluate."""
    return f"{shlex.join(commands['train'])} && {shlex.join(commands['evaluate'])}"


# ---------------------------------------------------------------- local backend

def run_local(plan: Plan, *, retry_failed: bool = False, parallel: int = 1,
              devices: Sequence[str] = (), cpu_threads: int | None = None,
              dry_run: bool = False, out=None) -> dict[str, Any]:
    """Runs (or, dry, prints) the sweep's unfinished runs here, holding the sweep folder's lock
    (`launch.lock`) while it reads and writes the manifest."""
    options = dict(retry_failed=retry_failed, parallel=parallel, devices=devices,
                   cpu_threads=cpu_threads, dry_run=dry_run, out=out or sys.stdout)
    if dry_run:
        return _run_local(plan, **options)
    with lock.hold(plan.sweep_dir) as held:
        return _run_local(plan, held=held, **options)


def repair(manifest: dict[str, Any], held: lock.Held | None, out) -> None:
    """Runs the manifest says are running, read by the launcher that holds the lock, were
    started by a launcher that is gone (killed: SIGKILL, a lost node): each becomes stopped (a
    launch resumes it from its checkpoint), unless its process still trains here, which is
    refused in one line (two processes must not train one run folder)."""
    if held and held.killed:
        print(f"the launcher that ran this sweep last (pid {held.killed.get('pid')} on "
              f"{held.killed.get('host')}, since {held.killed.get('started')}) was killed; "
              "repairing its manifest", file=out)
    host = lock.me()["host"]
    for entry in manifest["runs"]:
        if entry.get("status") != RUNNING:
            continue
        pid = entry.get("pid")
        if pid and entry.get("host") == host and lock.alive(pid, entry["workdir"]):
            raise lock.SweepBusy(
                f"run {entry['name']} is still being trained by process {pid} on this host, "
                f"though the launcher that started it is gone: stop it (kill -TERM -- -{pid}, "
                "its process group; it writes a checkpoint) and launch again")
        entry.update(status=STOPPED, repaired="its launcher was gone")
        print(f"{STOPPED}: {entry['name']} (marked running by a launcher that is gone; a launch "
              "resumes it)", file=out)


def _run_local(plan: Plan, *, retry_failed: bool, parallel: int, devices: Sequence[str],
               cpu_threads: int | None, dry_run: bool, out, held: lock.Held | None = None
               ) -> dict[str, Any]:
    manifest = plan.manifest(read_manifest(plan.sweep_dir))
    if not dry_run:
        repair(manifest, held, out)
    entries = {e["name"]: e for e in manifest["runs"]}
    todo = []
    for run in plan.runs:
        entry = entries[run.name]
        if is_finished(entry["workdir"]):
            entry["status"] = FINISHED
            print(f"finished, skipped: {run.name}", file=out)
        elif entry["status"] == FAILED and not retry_failed:
            print(f"failed before, not retried (--retry_failed): {run.name} "
                  f"(log {entry.get('log')})", file=out)
        else:
            todo.append(run)
    if plan.pack == packs.AUTO and dry_run:
        if all((epath.Path(plan.datasets[run.data]) / "metadata.json").exists()
               for run in todo if run.data):
            plan.measure_packs(todo, out)
        else:
            print("pack auto: measured once the data is prepared; the packs below are whole "
                  "groups", file=out)
    jobs = plan.jobs(todo)
    if dry_run:
        for variant, command in plan.prepare_commands().items():
            print(f"prepare {variant}: {shlex.join(command)}", file=out)
        for job in jobs:
            commands = plan.job_commands(job)
            if job.packed:
                print(f"pack {job.name}: {len(job.runs)} runs, one process: "
                      f"{', '.join(run.name for run in job.runs)}", file=out)
            for step, command in commands.items():
                print(f"{step} {job.name}: {shlex.join(command)}", file=out)
        return manifest
    write_manifest(plan.sweep_dir, manifest)
    needed = {run.data for run in todo if run.data}
    for variant, command in plan.prepare_commands().items():
        if variant not in needed:
            continue
        if (epath.Path(plan.datasets[variant]) / "metadata.json").exists():
            print(f"data {variant}: prepared already ({plan.datasets[variant]})", file=out)
            continue
        print(f"data {variant}: {shlex.join(command)}", file=out, flush=True)
        result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        if result.returncode:
            raise ToolFailed(f"preparing data variant {variant} failed:\n"
                             f"{result.stderr[-3000:]}")
    if plan.pack == packs.AUTO:
        plan.measure_packs(todo, out)
        jobs = plan.jobs(todo)
    parallel = max(1, min(parallel, len(devices)) if devices else parallel)
    running: list[tuple[subprocess.Popen, packs.Job, Any, float]] = []
    queue = list(jobs)
    free = list(range(parallel))
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        _run_queue(plan, manifest, entries, queue, running, free, devices, cpu_threads, parallel,
                   out)
    except (KeyboardInterrupt, SystemExit):
        # the launcher is stopped: pass the signal on, so that every run writes its checkpoint
        for process, job, _, _ in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process, job, _, _ in running:
            process.wait()
            for run in job.runs:
                entries[run.name].update(status=STOPPED, returncode=process.returncode)
                print(f"{STOPPED}: {run.name} (a relaunch resumes it)", file=out, flush=True)
        write_manifest(plan.sweep_dir, manifest)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return manifest


def _run_queue(plan: Plan, manifest: dict[str, Any], entries: dict[str, Any],
               queue: list[packs.Job], running: list, free: list[int], devices: Sequence[str],
               cpu_threads: int | None, parallel: int, out) -> None:
    """Starts queued jobs (runs, packs) as slots free up and records the end of each of their
    runs, until all are done."""
    while queue or running:
        while queue and free:
            job = queue.pop(0)
            slot = free.pop(0)
            running.append((*_start(plan, job, entries, slot, devices, cpu_threads, parallel),
                            slot))
            write_manifest(plan.sweep_dir, manifest)
            print(f"started: {job.name}" + (f" ({len(job.runs)} runs: "
                                            f"{', '.join(r.name for r in job.runs)})"
                                            if job.packed else ""), file=out, flush=True)
        time.sleep(0.2)
        for item in list(running):
            process, job, started, slot = item
            if process.poll() is None:
                continue
            running.remove(item)
            free.append(slot)
            for run in job.runs:
                entry = entries[run.name]
                entry["returncode"] = process.returncode
                entry["finished"] = _now()
                entry["seconds"] = round(time.perf_counter() - started, 1)
                if is_finished(entry["workdir"]) and (process.returncode == 0 or job.packed):
                    entry["status"] = FINISHED
                else:
                    entry["status"] = STOPPED if process.returncode in STOP_CODES else FAILED
                print(f"{entry['status']}: {run.name} ({entry['seconds']} s)"
                      + (f", log {entry['log']}" if entry["status"] == FAILED else "")
                      + (" (a relaunch resumes it)" if entry["status"] == STOPPED else ""),
                      file=out, flush=True)
            write_manifest(plan.sweep_dir, manifest)


def _start(plan: Plan, job: packs.Job, entries: dict[str, Any], slot: int,
           devices: Sequence[str], cpu_threads: int | None, parallel: int
           ) -> tuple[subprocess.Popen, packs.Job, float]:
    env = dict(os.environ)
    if devices:
        env["CUDA_VISIBLE_DEVICES"] = str(devices[slot])
    threads = cpu_threads or (max(1, (os.cpu_count() or 1) // parallel) if parallel > 1
                              else None)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), TF_NUM_INTRAOP_THREADS=str(threads),
                   TF_NUM_INTEROP_THREADS="1",
                   XLA_FLAGS=(env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen="
                              f"{'false' if threads == 1 else 'true'} "
                              f"intra_op_parallelism_threads={threads}").strip())
    first = entries[job.runs[0].name]
    # one log per process: a run's own folder, or for a pack SWEEP_DIR/packs/<pack>.log
    log = (epath.Path(plan.sweep_dir) / "packs" / f"{job.name}.log" if job.packed
           else epath.Path(first["workdir"]) / "launch.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    commands = plan.job_commands(job)
    for run in job.runs:
        entries[run.name].update(status=RUNNING, started=_now(), log=str(log))
        if job.packed:
            entries[run.name].update(pack=job.name, commands={
                "train": shlex.join(commands["train"]),
                "evaluate": shlex.join(evaluate_command(plan.workdir(run), plan.python))})
    handle = open(os.fspath(log), "a")     # a local file: the local backend runs here
    # its own process group: a signal to the launcher is passed on to the run's whole group
    process = subprocess.Popen(["bash", "-c", job_script(commands)], stdout=handle,
                               stderr=subprocess.STDOUT, env=env, start_new_session=True)
    handle.close()
    for run in job.runs:     # which process trains it, for a launcher that finds it orphaned
        entries[run.name].update(pid=process.pid, host=lock.me()["host"])
    return process, job, time.perf_counter()


# ---------------------------------------------------------------- SLURM backend

def slurm_scripts(plan: Plan, *, repo: str, partition: str | None = None,
                  time_limit: str = "24:00:00", gpus_per_task: int = 0, cpus_per_task: int = 8,
                  nodes: int = 1, max_parallel: int | None = None,
                  setup: str = "source .venv/bin/activate",
                  tasks: Sequence[tuple[int, packs.Job]] | None = None,
                  prepare: Sequence[str] | None = None) -> dict[str, str]:
    """{'prepare.sbatch': ..., 'runs.sbatch': ...} (prepare only when data is needed).

    Each command is a bash array (`TRAIN=(python -m ... --workdir '/a b/...')`, run as
    `"${TRAIN[@]}"`): every argument reaches the program as the launcher wrote it, whatever
    characters the paths hold. Training runs as a job step (`srun`), so `scancel --signal=TERM`
    reaches it: it writes its checkpoint and a resubmission resumes it. `tasks`: (array index,
    job) pairs, a job one run or a pack (default `slurm_todo`'s for every run; a relaunch leaves
    out the finished runs); `prepare`: the data variants to prepare (default all; a relaunch
    leaves out those prepared already)."""
    logs = f"{plan.sweep_dir}/slurm"
    header = ["#!/bin/bash"]

    def directives(name: str, extra: Sequence[str]) -> list[str]:
        lines = [_directive("job-name", name), _directive("time", time_limit),
                 _directive("cpus-per-task", cpus_per_task)]
        if partition:
            lines.append(_directive("partition", partition))
        return lines + list(extra)

    venv_check = (f'[ -f .venv/bin/activate ] || {{ echo "no .venv in $PWD: run make setup '
                  f'there first" >&2; exit 1; }}') if setup.startswith("source .venv/") else None
    body_start = ["set -euo pipefail", f"cd {shlex.quote(repo)}",
                  *([venv_check, setup] if setup else [])]
    scripts = {}
    commands = {variant: command for variant, command in plan.prepare_commands().items()
                if prepare is None or variant in prepare}
    if commands:
        lines = header + directives(f"her2jax-{plan.sweep.name}-prepare",
                                    [_directive("output", f"{logs}/prepare_%j.out")]) + body_start
        for variant, command in commands.items():
            lines.append(f"# data variant {variant} -> {plan.datasets[variant]}")
            lines.append(shlex.join(command))
        scripts["prepare.sbatch"] = "\n".join(lines) + "\n"
    if tasks is None:
        tasks = _tasks(plan, plan.runs)
    array = array_spec(sorted(index for index, _ in tasks)) + \
        (f"%{max_parallel}" if max_parallel else "")
    extra = [_directive("array", array), _directive("output", f"{logs}/%x_%A_%a.out")]
    if nodes > 1:
        extra += [_directive("nodes", nodes), _directive("ntasks-per-node", 1)]
    if gpus_per_task:
        extra.append(_directive("gpus-per-task", gpus_per_task))
    lines = header + directives(f"her2jax-{plan.sweep.name}", extra) + body_start
    lines.append('case "$SLURM_ARRAY_TASK_ID" in')
    for index, job in sorted(tasks, key=lambda task: task[0]):
        steps = plan.job_commands(job)
        lines.append(f"  {index}) RUN={shlex.quote(job.name)}; WORKDIRS=("
                     + " ".join(shlex.quote(plan.workdir(run)) for run in job.runs) + ")")
        lines.append(f"     TRAIN=({shlex.join(steps['train'])})")
        lines.append(f"     EVALUATE=({shlex.join(steps['evaluate'])}) ;;")
    lines.append('  *) echo "no run for task $SLURM_ARRAY_TASK_ID"; exit 1 ;;')
    lines.append("esac")
    lines.append('finished=1; for folder in "${WORKDIRS[@]}"; do '
                 '[ -f "$folder/eval/test/metrics.json" ] || finished=0; done')
    lines.append('if [ "$finished" = 1 ]; then echo "$RUN finished, skipped"; exit 0; fi')
    # a job step: one process per node (her2jax.main reads SLURM's environment for
    # jax.distributed), and the step is what `scancel --signal` and time limits signal
    lines.append('srun "${TRAIN[@]}"')
    lines.append('"${EVALUATE[@]}"')
    scripts["runs.sbatch"] = "\n".join(lines) + "\n"
    return scripts


def _directive(option: str, value: Any) -> str:
    """`#SBATCH --option=value`; a value with spaces or quotes in double quotes (sbatch reads
    them so), one that cannot be written so is refused."""
    text = str(value)
    if any(c in text for c in '"\\\n'):
        raise InvalidSetting(f"--{option} {text!r}: SLURM directives cannot hold a double quote, a "
                             f"backslash or a line break; choose another folder or name")
    if text != shlex.quote(text):
        text = f'"{text}"'
    return f"#SBATCH --{option}={text}"


def array_spec(indices: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8' (sbatch --array)."""
    if not indices:
        raise InvalidSetting("an array job needs at least one task")
    parts, first, last = [], indices[0], indices[0]
    for index in list(indices[1:]) + [None]:
        if index is not None and index == last + 1:
            last = index
            continue
        parts.append(str(first) if first == last else f"{first}-{last}")
        if index is not None:
            first = last = index
    return ",".join(parts)


def _tasks(plan: Plan, runs: Sequence[Run]) -> list[tuple[int, packs.Job]]:
    """(array index, job) for `runs`: unpacked, a run keeps its index in the sweep (a
    resubmission runs the same task numbers); packed, the packs are numbered from 0."""
    if plan.pack is None:
        index = {run.name: i for i, run in enumerate(plan.runs)}
        return [(index[run.name], packs.Job((run,))) for run in runs]
    return list(enumerate(plan.jobs(runs)))


def slurm_todo(plan: Plan) -> tuple[list[tuple[int, packs.Job]], list[str]]:
    """((array index, job) for the runs not finished, data variants those runs need that are
    not prepared yet): what a (re)submission has left to do."""
    runs = [run for run in plan.runs if not is_finished(plan.workdir(run))]
    tasks = _tasks(plan, runs)
    needed = sorted({run.data for run in runs if run.data})
    prepare = [v for v in needed
               if not (epath.Path(plan.datasets[v]) / "metadata.json").exists()]
    return tasks, prepare


def submit_slurm(plan: Plan, scripts: dict[str, str], *, dry_run: bool,
                 out=None) -> list[str]:
    out = out or sys.stdout
    folder = epath.Path(plan.sweep_dir) / "slurm"
    runs_script = shlex.quote(str(folder / "runs.sbatch"))
    commands = []
    if "prepare.sbatch" in scripts:
        commands.append(f"PREPARE=$(sbatch --parsable "
                        f"{shlex.quote(str(folder / 'prepare.sbatch'))})")
        commands.append(f"sbatch --dependency=afterok:$PREPARE {runs_script}")
    else:
        commands.append(f"sbatch {runs_script}")
    if dry_run:
        for name, text in scripts.items():
            print(f"# ---- {folder / name}", file=out)
            print(text, file=out)
        print("# ---- submit with", file=out)
        for command in commands:
            print(command, file=out)
        return commands
    previous = read_manifest(plan.sweep_dir) or {}
    active = [job for job in (previous.get("slurm") or {}).values() if job and slurm_active(job)]
    if active:
        raise lock.SweepBusy(
            f"{plan.sweep_dir}: SLURM job {', '.join(active)} of this sweep is still queued or "
            f"running (squeue -j {','.join(active)}): wait for it to end, or scancel it, then "
            "submit again (its runs would otherwise run twice)")
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in scripts.items():
        files.write_text(folder / name, text)
    manifest = plan.manifest(previous)
    manifest["slurm"] = {}
    write_manifest(plan.sweep_dir, manifest)
    dependency: list[str] = []
    if "prepare.sbatch" in scripts:
        job = _sbatch(["--parsable", str(folder / "prepare.sbatch")])
        manifest["slurm"]["prepare"] = job
        write_manifest(plan.sweep_dir, manifest)
        dependency = [f"--dependency=afterok:{job}"]
        print(f"submitted preparation: job {job}", file=out)
    job = _sbatch([*dependency, "--parsable", str(folder / "runs.sbatch")])
    manifest["slurm"]["runs"] = job
    write_manifest(plan.sweep_dir, manifest)
    array = next(line for line in scripts["runs.sbatch"].splitlines()
                 if line.startswith("#SBATCH --array=")).partition("=")[2]
    print(f"submitted runs: array job {job} (tasks {array}); logs in {folder}", file=out)
    return commands


def slurm_active(job: str) -> bool:
    """Whether SLURM job `job` (an array: any of its tasks) is still queued or running."""
    try:
        result = subprocess.run(["squeue", "-h", "-j", str(job), "-o", "%i", "-t",
                                 "PENDING,RUNNING,CONFIGURING,COMPLETING,SUSPENDED,REQUEUED"],
                                capture_output=True, text=True, timeout=60)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0 and bool(result.stdout.strip())


def _sbatch(arguments: list[str]) -> str:
    try:
        result = subprocess.run(["sbatch", *arguments], check=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    except FileNotFoundError:
        raise ToolFailed("sbatch not found: run this on the cluster's login node, or use "
                         "--dry_run to print the scripts") from None
    except subprocess.CalledProcessError as error:
        raise ToolFailed(f"sbatch failed: {error.stderr.strip()}") from None
    return result.stdout.strip().split(";")[0]


# ---------------------------------------------------------------- Cloud TPU backend

def tpu_steps(plan: Plan, *, name: str, zone: str, accelerator: str, version: str,
              queued: bool = False, reuse: bool = False, delete: bool = False,
              repo: str = ".", archive: str | None = None) -> list[tuple[str | None, str]]:
    """The gcloud commands that run the whole sweep on one TPU VM (all workers of a pod slice),
    each with its label ('train RUN', 'evaluate RUN', or None for the others). Each is one shell
    command line: the launcher runs it with `bash -c`, and a `--command=` it holds is quoted
    once more for the worker's shell."""
    tpu = "gcloud compute tpus"
    where = f"--zone={zone}"
    archive = archive or os.path.join(tempfile.gettempdir(), f"her2jax-{name}.tar.gz")
    steps: list[tuple[str | None, str]] = []
    if not reuse:
        if queued:
            steps.append((None, f"{tpu} queued-resources create {name}-qr --node-id={name} "
                                f"{where} --accelerator-type={accelerator} "
                                f"--runtime-version={version} --spot"))
            steps.append((None, f"{tpu} queued-resources describe {name}-qr {where}  "
                                f"# wait for state ACTIVE"))
        else:
            steps.append((None, f"{tpu} tpu-vm create {name} {where} "
                                f"--accelerator-type={accelerator} --version={version}"))
    steps.append((None, f"git -C {shlex.quote(repo)} archive --format=tar.gz --prefix=her2jax/ "
                        f"-o {shlex.quote(archive)} HEAD"))
    steps.append((None, f"{tpu} tpu-vm scp {shlex.quote(archive)} {name}:~/{TPU_ARCHIVE} "
                        f"{where} --worker=all"))

    def ssh(command: str, worker: str = "all") -> str:
        return f"{tpu} tpu-vm ssh {name} {where} --worker={worker} --command={shlex.quote(command)}"

    # the TPU VM images ship Python 3.10; her2jax needs 3.11 and jax's TPU runtime (libtpu)
    steps.append((None, ssh(f"{TPU_PYTHON} && tar xzf {TPU_ARCHIVE} && cd her2jax && "
                            f"make setup PYTHON=python3.11 JAX_EXTRA=tpu")))
    if plan.datasets:
        # preparation reads and writes local files: the cohort is copied to worker 0, prepared
        # there, and the prepared data copied into the bucket, where every worker reads it
        folder, manifest = _split_manifest(plan.source)
        if folder.startswith("gs://"):
            steps.append((None, ssh(f"mkdir -p {TPU_SOURCE} && gcloud storage rsync -r "
                                    f"{shlex.quote(folder)} {TPU_SOURCE}", worker="0")))
        else:
            steps.append((None, f"{tpu} tpu-vm scp --recurse {shlex.quote(folder)} "
                                f"{name}:{TPU_SOURCE} {where} --worker=0"))
        local = TPU_SOURCE + (f"/{manifest}" if manifest else "")
        for variant in plan.datasets:
            command = prepare_command(f"../{local}", f"../{TPU_DATA}", plan.sweep.data[variant],
                                      plan.python)
            steps.append((None, ssh(f"cd her2jax && {shlex.join(command)}", worker="0")))
        steps.append((None, ssh(f"gcloud storage rsync -r {TPU_DATA} "
                                f"{shlex.quote(plan.data_root)}", worker="0")))
    for job in plan.jobs(plan.runs, read_steps=False):
        job_commands = plan.job_commands(job)
        names = ",".join(run.name for run in job.runs)
        steps.append((f"train {names}",
                      ssh(f"cd her2jax && {shlex.join(job_commands['train'])}")))
        steps.append((f"evaluate {names}",
                      ssh(f"cd her2jax && {shlex.join(job_commands['evaluate'])} "
                          f"--multihost=on")))
    if delete:
        steps.append((None, f"{tpu} tpu-vm delete {name} {where} --quiet"))
    return steps


def tpu_commands(plan: Plan, **options: Any) -> list[str]:
    """The command lines of `tpu_steps` (what a dry run prints)."""
    return [command for _, command in tpu_steps(plan, **options)]


def run_tpu(plan: Plan, steps: Sequence[tuple[str | None, str]], repo: str) -> None:
    """Runs the steps here, one after the other, and keeps the sweep's manifest in the bucket
    up to date (`gcloud storage cp`: the launching machine needs gcloud, nothing else)."""
    dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout
    if dirty.strip():
        print(f"warning: {repo} has uncommitted changes; the workers get the last commit "
              f"(git archive HEAD)", file=sys.stderr)
    manifest = plan.manifest()
    entries = {entry["name"]: entry for entry in manifest["runs"]}
    upload_manifest(plan.sweep_dir, manifest)
    for label, command in steps:
        kind, _, label_names = (label or "").partition(" ")
        names = label_names.split(",") if label_names else []     # a pack's members
        print(f"$ {command}", file=sys.stderr, flush=True)
        if "# wait" in command:
            _wait_until_active(command.split("#")[0].strip())
            continue
        if kind == "train":
            for name in names:
                entries[name].update(status=RUNNING, started=_now())
            upload_manifest(plan.sweep_dir, manifest)
        try:
            subprocess.run(["bash", "-c", command], check=True)
        except subprocess.CalledProcessError as error:
            for name in names:
                entries[name].update(returncode=error.returncode, finished=_now(),
                                     status=STOPPED if error.returncode in STOP_CODES
                                     else FAILED)
            if names:
                upload_manifest(plan.sweep_dir, manifest)
            raise
        if kind == "evaluate":
            for name in names:
                entries[name].update(status=FINISHED, finished=_now(), returncode=0)
            upload_manifest(plan.sweep_dir, manifest)


def upload_manifest(sweep_dir: str, manifest: dict[str, Any]) -> None:
    """manifest.json into a gs:// sweep folder through `gcloud storage cp`."""
    manifest["updated"] = _now()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "manifest.json")
        with open(path, "w") as handle:
            json.dump(manifest, handle, indent=2, default=str)
        subprocess.run(["gcloud", "storage", "cp", path, f"{sweep_dir}/manifest.json"],
                       check=True, stdout=subprocess.DEVNULL)


TPU_PYTHON = ("sudo add-apt-repository -y ppa:deadsnakes/ppa && sudo apt-get install -y -qq "
              "python3.11 python3.11-venv")
TPU_SOURCE = "her2jax_source"   # in the home folder of worker 0, beside the code (her2jax/)
TPU_DATA = "her2jax_data"
TPU_ARCHIVE = "her2jax.tar.gz"   # the code, in the home folder of every worker


def _split_manifest(source: str) -> tuple[str, str | None]:
    """(folder, manifest file name or None): a `.csv` source is a manifest inside its folder."""
    if source.lower().endswith(".csv"):
        folder, _, manifest = source.rstrip("/").rpartition("/")
        return folder or ".", manifest
    return source.rstrip("/"), None


def _wait_until_active(describe: str, poll_seconds: int = 30, limit_seconds: int = 6 * 3600
                       ) -> None:
    """Polls a queued resource until its state is ACTIVE (spot capacity can take hours)."""
    waited = 0
    while True:
        state = subprocess.run(["bash", "-c", f"{describe} '--format=value(state.state)'"],
                               check=True, stdout=subprocess.PIPE, text=True).stdout.strip()
        if state == "ACTIVE":
            return
        if state in ("FAILED", "SUSPENDED") or waited >= limit_seconds:
            raise ToolFailed(f"queued resource state {state or 'unknown'} after {waited} s")
        print(f"queued resource: {state}; waiting", file=sys.stderr, flush=True)
        time.sleep(poll_seconds)
        waited += poll_seconds


# ---------------------------------------------------------------- command line

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launch.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", required=True, help="configs/sweeps/NAME.py[:ARG]")
    parser.add_argument("--backend", choices=BACKENDS, default="local")
    parser.add_argument("--sweep_dir", help="default sweeps/<name> (a gs:// path for tpu)")
    parser.add_argument("--source", help="cohort to prepare the data variants from")
    parser.add_argument("--only", help="run names matching this glob (or containing it)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run (repeatable)")
    parser.add_argument("--pack", help="K: train runs that differ only in seed, learning rate, "
                        "weight decay, betas, label smoothing or dropout together, at most K "
                        "in one process (one compiled step; every run draws its batches on the "
                        "device); auto (local backend): as many as fit this machine's device, "
                        "measured from the compiled step; off: one process per run (default: "
                        "the sweep's own choice)")
    parser.add_argument("--weights_dir", default=spec.WEIGHTS_DIR,
                        help="converted ImageNet weights, WEIGHTS_DIR/<model>.safetensors, that "
                             "the study sweeps' runs load (default %(default)s/); "
                             "--set init.pretrained= trains from scratch instead")
    parser.add_argument("--dry_run", action="store_true", help="print, run nothing")
    parser.add_argument("--retry_failed", action="store_true")
    parser.add_argument("--python", help="interpreter in the commands (default: local, this "
                        "one; slurm, `python` of the repository's .venv, activated; tpu, "
                        ".venv/bin/python)")
    local = parser.add_argument_group("local")
    local.add_argument("--parallel", type=int, default=1, help="runs at a time")
    local.add_argument("--devices", default="", help="GPU ids, one run per id at a time")
    local.add_argument("--cpu_threads", type=int, help="CPU threads per run")
    slurm = parser.add_argument_group("slurm")
    slurm.add_argument("--partition")
    slurm.add_argument("--time", default="24:00:00")
    slurm.add_argument("--gpus_per_task", type=int, default=0)
    slurm.add_argument("--cpus_per_task", type=int, default=8)
    slurm.add_argument("--nodes", type=int, default=1, help="nodes per run (multi-host)")
    slurm.add_argument("--max_parallel", type=int, help="array tasks at a time")
    slurm.add_argument("--repo", default=os.getcwd(),
                       help="the repository (slurm: its path on the cluster; tpu: the checkout "
                       "whose last commit the workers get)")
    tpu = parser.add_argument_group("tpu")
    tpu.add_argument("--tpu_name", default="her2jax")
    tpu.add_argument("--zone", default="us-central2-b")
    tpu.add_argument("--accelerator", default="v4-8")
    tpu.add_argument("--version", default="tpu-ubuntu2204-base")
    tpu.add_argument("--queued", action="store_true", help="spot capacity via queued resources")
    tpu.add_argument("--reuse", action="store_true", help="the TPU VM exists already")
    tpu.add_argument("--delete", action="store_true",
                     help="delete the TPU VM once the last run is evaluated")
    return parser.parse_args(argv)


def build_plan(args: argparse.Namespace) -> Plan:
    default, spec.WEIGHTS_DIR = spec.WEIGHTS_DIR, args.weights_dir
    try:
        sweep = load_sweep(args.sweep)
    finally:
        spec.WEIGHTS_DIR = default
    settings = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidSetting(f"--set {item!r}: expected KEY=VALUE")
        settings[key] = parse_value(value)
    sweep_dir = args.sweep_dir or f"sweeps/{sweep.name}"
    if args.backend == "tpu" and not sweep_dir.startswith("gs://"):
        raise InvalidSetting("the tpu backend keeps data and runs in a bucket: --sweep_dir "
                             "gs://BUCKET/sweeps/NAME")
    source = args.source
    if args.backend == "slurm":
        # the jobs start in the repository (--repo), not here: every path they get is absolute
        sweep_dir = os.path.abspath(sweep_dir)
        if source and "://" not in source:
            source = os.path.abspath(source)
    default_python = {"local": sys.executable or "python", "slurm": "python",
                      "tpu": ".venv/bin/python"}[args.backend]
    python = args.python or default_python
    extra = ["--multihost=on"] if args.backend == "tpu" else []
    pack = packs.parse_pack(args.pack if args.pack is not None else sweep.pack)
    if pack == packs.AUTO and args.backend != "local":
        raise InvalidSetting("--pack auto measures the devices of the machine it runs on: give "
                             f"--pack K for the {args.backend} backend")
    return Plan(sweep, sweep_dir, source=source, only=args.only, settings=settings,
                python=python, extra_train=extra, pack=pack)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        plan = build_plan(args)
        if not plan.runs:
            raise InvalidSetting(f"no run matches --only {args.only!r}")
        problem = unknown_override(plan.runs)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
        if args.backend != "tpu":
            # the tpu backend's runs read their weights on the VM, not here
            check_weights(plan.runs, os.path.abspath(args.repo) if args.backend == "slurm"
                          else os.getcwd(), dry_run=args.dry_run)
        print(f"sweep {plan.sweep.name}: {len(plan.runs)} runs, {len(plan.datasets)} data "
              f"variants, in {plan.sweep_dir}"
              + (f"; packs of at most {plan.pack}" if isinstance(plan.pack, int) else
                 "; packs as large as fit the device" if plan.pack else ""), file=sys.stderr)
        if args.backend == "local":
            manifest = run_local(plan, retry_failed=args.retry_failed, parallel=args.parallel,
                                 devices=[d for d in args.devices.split(",") if d],
                                 cpu_threads=args.cpu_threads, dry_run=args.dry_run)
            failed = [r["name"] for r in manifest["runs"] if r["status"] == FAILED]
            if failed and not args.dry_run:
                print(f"{len(failed)} failed: {', '.join(failed)}", file=sys.stderr)
                return 1
        elif args.backend == "slurm":
            tasks, prepare = slurm_todo(plan)
            if not tasks:
                print(f"all {len(plan.runs)} runs are finished: nothing to submit "
                      f"(python -m launch.collect {shlex.quote(plan.sweep_dir)})")
                return 0
            finished = len(plan.runs) - sum(len(job.runs) for _, job in tasks)
            if finished:
                print(f"{finished} of {len(plan.runs)} runs finished already: submitting the "
                      f"other {len(tasks)}", file=sys.stderr)
            scripts = slurm_scripts(plan, repo=os.path.abspath(args.repo),
                                    partition=args.partition, time_limit=args.time,
                                    gpus_per_task=args.gpus_per_task,
                                    cpus_per_task=args.cpus_per_task, nodes=args.nodes,
                                    max_parallel=args.max_parallel, tasks=tasks, prepare=prepare,
                                    # an interpreter given by path needs no activated venv
                                    setup="" if args.python else "source .venv/bin/activate")
            with contextlib.nullcontext() if args.dry_run else lock.hold(plan.sweep_dir):
                submit_slurm(plan, scripts, dry_run=args.dry_run)
        else:
            steps = tpu_steps(plan, name=args.tpu_name, zone=args.zone,
                              accelerator=args.accelerator, version=args.version,
                              queued=args.queued, reuse=args.reuse, delete=args.delete,
                              repo=os.path.abspath(args.repo))
            if args.dry_run:
                print("\n".join(command for _, command in steps))
            else:
                with lock.hold(plan.sweep_dir):
                    run_tpu(plan, steps, os.path.abspath(args.repo))
    except (UserError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as error:
        print(f"error: {error.cmd} exited with {error.returncode}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
