"""Train: `python -m her2jax.main --config configs/resnet.py:resnet18 --workdir RUN [--config.k=v]`.

Re-running the same command resumes from the latest checkpoint in RUN; SIGTERM (preemption) or
a first Ctrl-C writes a checkpoint and exits with 143 or 130 (a second Ctrl-C stops at once). A relaunch may change only the keys in
`train.RELAUNCH_KEYS` (e.g. total_steps, to extend the run); any other change is refused.

Several processes (hosts of a TPU pod slice, SLURM tasks, or explicit flags) run the same
command; see `her2jax.distributed` for what `--multihost` detects. Two processes on one machine:
    python -m her2jax.main ... --coordinator_address 127.0.0.1:12345 --num_processes 2 --process_id 0
    python -m her2jax.main ... --coordinator_address 127.0.0.1:12345 --num_processes 2 --process_id 1
"""
from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "configs/<family>.py:<variant>[,runlocal]",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "run folder (checkpoints, logs); local path or gs://")
flags.DEFINE_enum("multihost", "auto", ["auto", "on", "off"],
                  "start jax.distributed: auto (when the environment describes several "
                  "processes), on (always; Cloud TPU pod slices), off")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (explicit multi-process)")
flags.DEFINE_integer("num_processes", None, "number of processes (explicit multi-process)")
flags.DEFINE_integer("process_id", None, "this process's index (explicit multi-process)")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, except that a mistyped key or a bad value is one line on stderr and
    exit code 2 (as argparse does) instead of chained tracebacks."""
    try:
        argv = FLAGS(argv)
        FLAGS.config.keys()  # a config file that could not be read fails here
        return argv
    except (flags.Error, AttributeError, KeyError, OSError) as error:
        print(f"error: {flag_error(argv, error)}", file=sys.stderr)
        sys.exit(2)


def flag_error(argv: list[str], error: Exception) -> str:
    """The one line that says what is wrong with the command line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if isinstance(error, flags.Error):   # a traceback inside: its first and last lines
        return f"{lines[0]} {lines[-1]}" if "Traceback" in str(error) else " ".join(lines)
    if isinstance(error, OSError):       # the config file could not be loaded
        return f"--config: {lines[-1]}"
    # an override key the config lacks: ml_collections names neither the flag nor the path
    from configs import common

    spec = ""
    for arg, following in zip(argv, argv[1:] + [""]):
        if arg == "--config":
            spec = following
        elif arg.startswith("--config="):
            spec = arg.partition("=")[2]
    try:
        config = common.load(spec)
    except Exception:  # noqa: BLE001 (the original message is the fallback)
        return lines[-1] if lines else repr(error)
    for arg in argv:
        if arg.startswith("--config."):
            key = arg.removeprefix("--config.").partition("=")[0]
            problem = common.unknown_key(config, key)
            if problem:
                return f"--config.{key}: {problem}"
    return lines[-1] if lines else repr(error)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    from absl import logging

    from her2jax import distributed, train
    from her2jax.errors import UserError

    logging.set_verbosity(logging.WARNING)  # orbax narrates every save at INFO
    config = FLAGS.config
    if not config.data_dir:
        raise app.UsageError("set --config.data_dir to a prepared dataset "
                             "(the path python -m data_prep.prepare printed)")
    try:
        distributed.initialize(FLAGS.multihost, coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    try:
        train.train_and_evaluate(config, FLAGS.workdir)
    except train.StopRequested as stop:
        print(stop, file=sys.stderr)
        sys.exit(stop.exit_code)     # not 0: a sweep must not take a stopped run for finished
    except (UserError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
