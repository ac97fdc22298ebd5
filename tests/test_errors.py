"""Errors users cause end a command in one line; errors in our own code keep their traceback.

Every command-line boundary is driven with its work replaced by a function that raises: a
`UserError` (and an OSError, the environment's) must give `error: <message>` on one line and
exit code 1, a plain ValueError/RuntimeError/TypeError (a bug, or an XLA failure) must escape.
The training command's one-line errors are run for real in test_configs.
"""
from __future__ import annotations

import importlib

import pytest

from her2jax import errors

# (command module, attribute its main calls to do the work, arguments main needs)
COMMANDS = [
    ("her2jax.evaluate", "evaluate_run", ["--workdir", "RUN"]),
    ("her2jax.predict", "predict", ["--workdir", "RUN", "--pre", "a", "--early", "b",
                                    "--late", "c", "--box", "0,1,0,1,0,1"]),
    ("her2jax.explain", "explain_run", ["--workdir", "RUN"]),
    ("her2jax.compare", "read_predictions", ["RUN_A", "RUN_B"]),
    ("her2jax.demo", "run", ["--out", "OUT"]),
    ("launch.collect", "collect", ["SWEEP"]),
    ("launch.sweep", "build_plan", ["--sweep", "configs/sweeps/lr_search.py"]),
    ("data_prep.prepare", "build", ["--source", "SRC", "--data_dir", "DATA"]),
]


def raising(error: Exception):
    def work(*args, **kwargs):
        raise error
    return work


@pytest.mark.parametrize("module, work, argv", COMMANDS, ids=[c[0] for c in COMMANDS])
@pytest.mark.parametrize("error", [errors.InvalidSetting("the flag --x is wrong"),
                                   errors.MissingInput("no RUN/config.json"),
                                   errors.TrainingDiverged("loss is NaN at step 3"),
                                   errors.ToolFailed("sbatch failed: no partition"),
                                   PermissionError(13, "Permission denied", "/out")],
                         ids=["setting", "missing", "diverged", "tool", "oserror"])
def test_user_errors_end_in_one_line(module, work, argv, error, monkeypatch, capsys):
    command = importlib.import_module(module)
    monkeypatch.setattr(command, work, raising(error))
    assert command.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == f"error: {error}"
    assert "Traceback" not in "\n".join(err)


@pytest.mark.parametrize("module, work, argv", COMMANDS, ids=[c[0] for c in COMMANDS])
@pytest.mark.parametrize("bug", [ValueError("shapes (3,) and (4,) do not match"),
                                 RuntimeError("RESOURCE_EXHAUSTED: out of memory"),
                                 TypeError("unsupported operand"),
                                 FloatingPointError("a NaN in our own arithmetic")])
def test_our_bugs_keep_their_traceback(module, work, argv, bug, monkeypatch):
    command = importlib.import_module(module)
    monkeypatch.setattr(command, work, raising(bug))
    with pytest.raises(type(bug), match=str(bug).split("(")[0]):
        command.main(argv)


def test_a_user_error_is_also_the_builtin_error_callers_catch():
    assert issubclass(errors.InvalidSetting, ValueError)
    assert issubclass(errors.BadInput, ValueError)
    assert issubclass(errors.MissingInput, FileNotFoundError)
    assert issubclass(errors.TrainingDiverged, FloatingPointError)
    assert issubclass(errors.ToolFailed, RuntimeError)
    from data_prep.errors import BadCaseError
    from her2jax.analysis.evaluation import PreparationMismatch
    from her2jax.data.pipeline import MissingSplit
    from her2jax.run_folder import NotARunFolder

    for error_type in (BadCaseError, PreparationMismatch, MissingSplit, NotARunFolder):
        assert issubclass(error_type, errors.UserError), error_type

