"""Train: `python -m her2jax.main --config configs/resnet.py:resnet18 --workdir RUN [--config.k=v]`.

Re-running the same command resumes from the latest checkpoint in RUN; SIGTERM (preemption)
writes a checkpoint and exits cleanly.

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


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    from absl import logging

    from her2jax import distributed, train

    logging.set_verbosity(logging.WARNING)  # orbax narrates every save at INFO
    config = FLAGS.config
    if not config.data_dir:
        raise app.UsageError("set --config.data_dir to a prepared dataset "
                             "(the path python -m data_prep.prepare printed)")
    try:
        distributed.initialize(FLAGS.multihost, coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    except (ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    try:
        train.train_and_evaluate(config, FLAGS.workdir)
    except train.StopRequested as stop:
        print(stop, file=sys.stderr)
    except (FloatingPointError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
