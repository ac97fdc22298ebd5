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
