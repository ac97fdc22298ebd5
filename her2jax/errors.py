"""Errors a user can fix, kept apart from our own bugs.

Whatever is raised for a setting we refuse, an input that is not there, an input that is there
but unusable, a run that diverged or an outside tool that failed derives from `UserError`. The
command lines catch `UserError` (and `OSError`: a path the system could not read or write) and
print its message as one line with exit code 1; any other exception is a bug in her2jax and
keeps its traceback.

    UserError
      InvalidSetting    (ValueError)         a config key, flag, option or sweep definition
      BadInput          (ValueError)         a file or dataset that cannot be used as it is
                                             (data_prep's BadCaseError and the preparation
                                             mismatches are of this kind)
      MissingInput      (FileNotFoundError)  a file, folder, run, checkpoint or split that is
                                             not where the user said
      TrainingDiverged  (FloatingPointError) NaN/inf loss or outputs
      ToolFailed        (RuntimeError)       an outside program (sbatch, gcloud, a preparation
                                             subprocess) or service failed

The second base keeps `except ValueError` (and the like) in callers' code working.
This module imports nothing, so `data_prep`, `launch` and `configs` use it freely.
"""
from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; its message is the one line a command prints."""


class InvalidSetting(UserError, ValueError):
    """A config key, flag, option or definition with a value her2jax refuses."""


class BadInput(UserError, ValueError):
    """A file or dataset that exists but cannot be used as it is."""


class MissingInput(UserError, FileNotFoundError):
    """A file, folder, run, checkpoint or split that is not where the user said."""


class TrainingDiverged(UserError, FloatingPointError):
    """The loss or the model's outputs became NaN/inf."""


class ToolFailed(UserError, RuntimeError):
    """An outside program or service failed (its own message is included)."""
