"""Property-based tests (hypothesis) of the readers of what users bring: generated malformed CSV
text and manifest rows end either in a listing or in the one-line BadInput naming the file, never
in another exception, and every patient of a listing is a case or a recorded problem, never
both; NIfTI files with damaged header fields end in the patient's slices or in the patient's
one-line error saying what is wrong."""
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


# NIfTI-1 header fields a damaged or unusual file gets wrong: (byte offset, size)
HEADER_FIELDS = {"sizeof_hdr": (0, 4), "dim": (40, 16), "datatype": (70, 2), "bitpix": (72, 2),
                 "pixdim": (76, 32), "vox_offset": (108, 4), "scl_slope": (112, 4),
                 "scl_inter": (116, 4), "qform_code": (252, 2), "sform_code": (254, 2),
                 "magic": (344, 4)}


@st.composite
def damaged_headers(draw) -> list[tuple[int, bytes]]:
    """Overwrites inside the header's fields: a field's whole bytes or some of them."""
    edits = []
    for name in draw(st.lists(st.sampled_from(sorted(HEADER_FIELDS)), min_size=1, max_size=3)):
        offset, size = HEADER_FIELDS[name]
        start = draw(st.integers(offset, offset + size - 1))
        edits.append((start, draw(st.binary(min_size=1, max_size=offset + size - start))))
    return edits


@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=damaged_headers(), compressed=st.booleans())
def test_any_nifti_header_is_read_or_is_the_patients_one_line_error(tmp_path, edits, compressed):
    """A phase whose header is damaged ends, through the preparation of that patient, either in
    its slices or in its one-line error naming the file and what is wrong: never in another
    exception (which would stop a --skip_bad preparation) nor in a patient without slices and
    without error."""
    import gzip

    import nibabel as nib
    import numpy as np

    from data_prep import her2_dce, pipeline
    from data_prep.errors import BadCaseError
    from data_prep.sources import Case

    rng = np.random.default_rng(0)
    clean = [str(tmp_path / f"phase{t}.nii.gz") for t in range(3)]
    for t, path in enumerate(clean):
        nib.save(nib.Nifti1Image(rng.uniform(100, 400, (12, 10, 6)).astype(np.float32)
                                 + 50 * t, np.eye(4)), path)
    raw = bytearray(gzip.decompress(open(clean[0], "rb").read()))
    for start, value in edits:
        raw[start:start + len(value)] = value
    damaged = str(tmp_path / ("damaged.nii.gz" if compressed else "damaged.nii"))
    with open(damaged, "wb") as handle:
        handle.write(gzip.compress(bytes(raw)) if compressed else bytes(raw))
    case = Case(patient_id="P-1", label=1, cohort="c", phases=(damaged, clean[1], clean[2]),
                box=(1, 3, 2, 6, 2, 8))
    params = PrepParams(image_size=16)
    [(_, result)] = list(her2_dce._map(pipeline.prepare_case, [case], (params,), None))
    if isinstance(result, BadCaseError):
        text = str(result)
        assert text.startswith("patient P-1: ") and "\n" not in text
        assert damaged in text or clean[1] in text or clean[2] in text, text
        # and the readers say what is wrong: not the catch-all for exceptions nobody expected
        assert "while preparing it" not in text, text
        return
    assert result.slices and all(s.image.shape == (16, 16, 3) and s.image.dtype == np.uint8
                                 for s in result.slices)
