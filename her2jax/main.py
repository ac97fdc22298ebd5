"""Train: `python -m her2jax.main --config configs/resnet.py:resnet18 --workdir RUN [--config.k=v]`.

Re-running the same command resumes from the latest checkpoint in RUN; SIGTERM (preemption) or
a first Ctrl-C writes a checkpoint and exits with 143 or 130 (a second Ctrl-C stops at once). A
relaunch may change only the keys in `her2jax.training.loop.RELAUNCH_KEYS` (e.g. total_steps,
to extend the run); any other change is refused.

`--pack KEY=V1,V2` (repeatable) trains the product of the values as one pack: one compiled step
for every member, each in its own run folder WORKDIR/<key>=<value>-... (see README "Packed runs").
`--member '{"workdir": "RUN2", "config": {"seed": 1, "optimizer.learning_rate": 3e-4}}'`
(repeatable) packs the command's own run (WORKDIR, with its config) with further members, each
in its own folder with its config changed by the keys given: what `launch.sweep --pack` runs.

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
flags.DEFINE_multi_string("pack", [], "KEY=V1,V2,...: train the product of these values as one "
                          "pack (one compiled step), each member in WORKDIR/<key>=<value>-...; "
                          "KEY one of her2jax.training.loop.PACK_KEYS; needs "
                          "input.source=device")
flags.DEFINE_multi_string("member", [], "JSON {\"workdir\": ..., \"config\": {KEY: VALUE}}: "
                          "another member of a pack with this run (repeatable); KEYs among "
                          "her2jax.training.loop.PACK_KEYS; needs input.source=device")
flags.DEFINE_enum("multihost", "auto", ["auto", "on", "off"],
                  "start jax.distributed: auto (when the environment describes several "
                  "processes), on (always; Cloud TPU pod slices), off")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (explicit multi-process)")
flags.DEFINE_integer("num_processes", None, "number of processes (explicit multi-process)")
flags.DEFINE_integer("process_id", None, "this process's index (explicit multi-process)")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, after our own check of `--config` and its overrides, so that a
    mistyped key, a bad value or an unreadable config is one line on stderr and exit code 2 (as
    argparse does) instead of chained tracebacks."""
    from her2jax.errors import UserError

    try:
        check_config_arguments(argv[1:])
        return FLAGS(argv)
    except UserError as error:   # ours: the config file, its variant, an override key
        message = str(error)
    except flags.Error as error:  # absl's, one line: a value that does not parse, an unknown flag
        message = str(error)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def config_arguments(args: list[str]) -> tuple[str | None, list[str]]:
    """(the `--config` spec or None, the keys that `--config.KEY[=VALUE]` overrides)."""
    spec, keys = None, []
    for arg, following in zip(args, args[1:] + [""]):
        if arg == "--config":
            spec = following
        elif arg.startswith("--config="):
            spec = arg.partition("=")[2]
        elif arg.startswith("--config."):
            keys.append(arg.removeprefix("--config.").partition("=")[0])
    return spec, keys


def check_config_arguments(args: list[str]) -> None:
    """Loads the `--config` file as absl will and checks that every override names a setting;
    raises the UserError that says what is wrong (absl would name neither flag nor path)."""
    from configs import common
    from her2jax.errors import InvalidSetting

    spec, keys = config_arguments(args)
    if not spec:
        return   # absl says that --config is required
    config = common.load(spec)
    for key in keys:
        problem = common.unknown_key(config, key)
        if problem:
            raise InvalidSetting(f"--config.{key}: {problem}")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    from absl import logging

    from her2jax import distributed
    from her2jax.errors import UserError
    from her2jax.training import loop as train

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
        if FLAGS.pack and FLAGS.member:
            raise app.UsageError("--pack and --member are two ways to name a pack: give one")
        if FLAGS.pack:
            train.train_pack(*train.pack_members(config, FLAGS.workdir, FLAGS.pack))
        elif FLAGS.member:
            train.train_pack(*train.listed_members(config, FLAGS.workdir, FLAGS.member))
        else:
            train.train_and_evaluate(config, FLAGS.workdir)
    except train.StopRequested as stop:
        print(stop, file=sys.stderr)
        sys.exit(stop.exit_code)     # not 0: a sweep must not take a stopped run for finished
    except (UserError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
