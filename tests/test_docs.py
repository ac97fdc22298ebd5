"""The README tells the truth about what the code offers."""
import pathlib
import re

from data_prep import normalization

README = (pathlib.Path(__file__).parents[1] / "README.md").read_text()


def test_normalization_table_matches_registry():
    block = re.search(r"<!-- normalization table.*?-->\n(.*?)<!-- end of normalization table -->",
                      README, re.S)
    assert block, "README lost its normalization table markers"
    assert block.group(1).strip() == normalization.markdown_table().strip()


def test_readme_states_the_make_targets_and_commands():
    for command in ("make setup", "make test", "make demo", "python -m data_prep.synthetic",
                    "python -m data_prep.prepare"):
        assert command in README


def _expand(pattern: str) -> set[str]:
    """`vit_{tiny,small}_patch{16,32}` -> the four names."""
    match = re.search(r"\{([^}]*)\}", pattern)
    if not match:
        return {pattern}
    return set().union(*(_expand(pattern[:match.start()] + choice + pattern[match.end():])
                         for choice in match.group(1).split(",")))


def test_model_table_names_every_registered_model():
    from her2jax import models

    section = README.split("## Models (`her2jax/models/`)")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    named = set()
    for row in rows:
        named |= set().union(*(_expand(name) for name in re.findall(r"`([a-z0-9_{},]+)`",
                                                                    row.split("|")[1])))
    assert named == set(models.names())
