"""Train: `python -m her2jax.main --config configs/resnet.py:resnet18 --workdir RUN [--config.k=v]`.

Re-running the same command resumes from the latest checkpoint in RUN; SIGTERM (preemption)
writes a checkpoint and exits cleanly.
"""
from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "configs/<family>.py:<variant>[,runlocal]",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "run folder (checkpoints, logs); local path or gs://")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    from absl import logging

    from her2jax import train

    logging.set_verbosity(logging.WARNING)  # orbax narrates every save at INFO
    config = FLAGS.config
    if not config.data_dir:
        raise app.UsageError("set --config.data_dir to a prepared dataset "
                             "(the path python -m data_prep.prepare printed)")
    try:
        train.train_and_evaluate(config, FLAGS.workdir)
    except train.StopRequested as stop:
        print(stop, file=sys.stderr)
    except (FloatingPointError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
