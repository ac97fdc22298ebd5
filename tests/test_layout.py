"""The package layout the README's Design section draws: imports follow the data's path, library
modules import no command and no other module's private names, the settings the configs share
with the library load without JAX, and every command still answers `--help`."""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "her2jax"
COMMANDS = ("main", "evaluate", "compare", "predict", "explain", "convert", "demo")
SHARED = ("errors", "run_folder", "distributed")
# what each subpackage may import of the others (shared modules are open to all)
ALLOWED = {
    "data": {"data"},
    "models": {"models"},
    "training": {"training", "data", "models", "analysis.metrics"},
    "analysis": {"analysis", "data", "models", "training"},
}


def first_party_imports(path: pathlib.Path, top_level_only: bool = False
                        ) -> list[tuple[str, list[str], int]]:
    """(module imported, names imported from it, line) for every first-party import in `path`,
    including those inside functions unless `top_level_only`."""
    found = []
    tree = ast.parse(path.read_text())
    for node in (tree.body if top_level_only else ast.walk(tree)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] in ("her2jax", "data_prep", "launch", "configs"):
                names = [alias.name for alias in node.names]
                # `from her2jax import models` imports the module her2jax.models
                if node.module in ("her2jax", "her2jax.data", "her2jax.training",
                                   "her2jax.analysis", "her2jax.models"):
                    found += [(f"{node.module}.{name}", [], node.lineno) for name in names]
                else:
                    found.append((node.module, names, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names
                      if alias.name.split(".")[0] == "her2jax"]
    return found


def library_modules() -> list[pathlib.Path]:
    return sorted(p for p in PACKAGE.rglob("*.py")
                  if p.parent != PACKAGE or p.stem in SHARED)


def test_imports_follow_the_data_path():
    """Shared modules import no subpackage when they load (anything can import them); the
    restore in `run_folder` imports models and training when it is called."""
    wrong = []
    for path in library_modules():
        relative = path.relative_to(PACKAGE)
        shared = len(relative.parts) == 1
        for module, _, line in first_party_imports(path, top_level_only=shared):
            if not module.startswith("her2jax."):
                continue
            target = module.removeprefix("her2jax.")
            top = target.split(".")[0]
            if top in COMMANDS:
                wrong.append(f"{relative}:{line} imports the command {module}")
            elif len(relative.parts) > 1 and top in ALLOWED:
                allowed = ALLOWED[relative.parts[0]]
                if not any(target == a or target.startswith(a + ".") or top == a
                           and "." not in a for a in allowed):
                    wrong.append(f"{relative}:{line} imports {module}")
            elif shared and top in ALLOWED:
                wrong.append(f"{relative}:{line}: a shared module imports {module}")
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_another_modules_private_names():
    wrong = []
    for path in [*PACKAGE.rglob("*.py"), *(ROOT / "data_prep").rglob("*.py"),
                 *(ROOT / "launch").rglob("*.py"), *(ROOT / "configs").rglob("*.py")]:
        for module, names, line in first_party_imports(path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {private} from {module}")
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__") and isinstance(node.value, ast.Name)
                    and node.value.id in ("metrics", "stats", "evaluation", "pipeline",
                                          "records", "sampling", "steps", "inference",
                                          "models", "resnet", "vit", "planted", "common")):
                wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} uses "
                             f"{node.value.id}.{node.attr}")
    assert not wrong, "\n".join(wrong)


def test_configs_and_their_shared_settings_load_without_jax_or_tensorflow():
    """The configs take the augmentation defaults and the model presets from the library; the
    sweep launcher loads every config, so none of that may pull in JAX or TensorFlow."""
    code = ("import sys; from configs import common, resnet, vit; "
            "resnet.get_config('triple18'); vit.get_config(); common.base_config(); "
            "heavy = [m for m in ('jax', 'flax', 'tensorflow') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_configs_use_the_library_presets():
    from configs import common, resnet
    from her2jax.data.augment_options import DEFAULT_AUGMENT
    from her2jax.models.presets import DUAL_ATTENTION, TRIPLE_HEAD

    assert common.base_config().input.augment.to_dict() == DEFAULT_AUGMENT
    assert resnet.get_config("resnet34").model.kwargs.to_dict() == DUAL_ATTENTION
    assert resnet.get_config("triple18").model.kwargs.to_dict() == TRIPLE_HEAD
    assert resnet.get_config("plain18").model.kwargs.to_dict() == dict(DUAL_ATTENTION,
                                                                       attention="none")


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "main"] + ["models.__main__"])
def test_every_command_module_answers_help(command, capsys):
    """`python -m her2jax.<command> --help` exits 0 with its usage, imported in this process:
    the entry points survive the moves (`her2jax.main` runs as a command in test_configs.py)."""
    import importlib

    module = importlib.import_module(f"her2jax.{command}")
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    assert f"python -m her2jax.{command.removesuffix('.__main__')}" in capsys.readouterr().out
