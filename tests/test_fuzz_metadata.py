"""Property-based tests (hypothesis) of the metadata readers: generated malformed CSV text and
manifest rows end either in a listing or in the one-line BadInput naming the file, never in
another exception; every patient of a listing is a case or a recorded problem, never both."""
from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_prep.params import PrepParams
from data_prep.sources import manifest
from data_prep.sources.table import read_table
from her2jax.errors import BadInput

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
CELLS = st.text(alphabet=st.sampled_from(list("ab01 ;,\t\"\r\n-+\ufeffé\x00")), max_size=8)


@SETTINGS
@given(data=st.binary(max_size=200) | st.lists(st.lists(CELLS, max_size=6), max_size=6).map(
    lambda rows: "\n".join(",".join(row) for row in rows).encode("utf-8")))
def test_any_bytes_are_a_table_or_one_line_naming_the_file(tmp_path, data):
    path = tmp_path / "meta.csv"
    path.write_bytes(data)
    try:
        names, rows = read_table(str(path))
    except BadInput as error:
        assert str(error).startswith(f"{path}: ") and "\n" not in str(error)
        return
    assert all(name == name.strip() and name for name in names)
    assert all(set(row) == set(names) for row in rows)


LABELS = st.sampled_from(["0", "1", "HER2+", "HER2-", "", "2", "x", " 1 ", "positive"])
BOXES = st.sampled_from(["", "0 1 0 1 0 1", "1,2,3", "5 4 0 1 0 1", "a b c d e f", "0 0 0 0 0 0"])
SPLITS = st.sampled_from(["", "train", "test", "external", "TRAIN", "val"])
IDS = st.sampled_from(["P1", "P2", "P3", "", " P1 ", "P\u00e92"])


@SETTINGS
@given(rows=st.lists(st.tuples(IDS, LABELS, BOXES, SPLITS), max_size=6),
       delimiter=st.sampled_from([",", ";", "\t"]), bom=st.booleans())
def test_any_manifest_lists_its_patients_or_refuses_in_one_line(tmp_path, rows, delimiter, bom):
    folder = tmp_path / "site"
    folder.mkdir(exist_ok=True)
    for phase in ("pre", "early", "late"):
        (folder / f"{phase}.nii.gz").write_bytes(b"")
    header = ["patient_id", "label", "pre", "early", "late", "box", "split"]
    lines = [delimiter.join(header)] + [
        delimiter.join([pid, label, "pre.nii.gz", "early.nii.gz", "late.nii.gz", box, split])
        for pid, label, box, split in rows]
    path = folder / "manifest.csv"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + "\r\n".join(lines).encode())
    try:
        listing = manifest.list_cases(str(path), PrepParams())
    except BadInput as error:
        assert str(error).startswith(str(path)) and "\n" not in str(error)
        return
    kept = [c.patient_id for c in listing.cases]
    refused = [p.patient_id for p in listing.problems]
    ids = [pid.strip() for pid, *_ in rows if any(v.strip() for v in (pid, *_))]
    # every patient is a case or a recorded problem (a repeated id: every copy refused), once
    assert set(kept) | set(refused) == {pid or "<no patient_id>" for pid in ids}
    assert len(set(kept)) == len(kept) and not set(kept) & set(refused)
    assert all(os.path.isabs(path) for c in listing.cases for path in c.phases)
