"""Metadata tables as spreadsheets save them: a CSV read with a UTF-8 byte-order mark or without,
Windows or Unix line ends, a comma, semicolon or tab delimiter (from the header line), spaces
around names and values, and blank rows (trailing or between) left out. What cannot be read is
refused in one line naming the file and what is wrong.
"""
from __future__ import annotations

import csv
import io

from her2jax.errors import BadInput

DELIMITERS = (",", ";", "\t")


def delimiter_of(header: str) -> str:
    """The one of DELIMITERS a header line holds most of."""
    return max(DELIMITERS, key=header.count)


def column_names(path: str) -> set[str]:
    """The column names of a CSV's header line, read leniently (the first 64 KiB, undecodable
    bytes replaced): for telling which CSVs of a folder are which, before reading one."""
    with open(path, "rb") as handle:
        head = handle.read(65536).decode("utf-8-sig", errors="replace")
    header = next((line for line in head.splitlines() if line.strip()), "")
    return {name.strip() for name in next(csv.reader([header], delimiter=delimiter_of(header)),
                                          [])}


def read_table(path: str) -> tuple[list[str], list[dict[str, str]]]:
    """(column names, rows as {column: value}), names and values stripped of spaces, blank
    rows left out; the delimiter is the one of DELIMITERS the header line holds most of."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise BadInput(f"{path}: cannot be read ({error.strerror or error})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise BadInput(f"{path}: not UTF-8 text (byte 0x{data[error.start]:02x} at offset "
                       f"{error.start}); save it as 'CSV UTF-8'") from None
    if "\x00" in text:
        raise BadInput(f"{path}: holds NUL bytes; not a CSV text file (a spreadsheet saved in "
                       "its own format?)")
    lines = text.splitlines()
    header = next((line for line in lines if line.strip()), "")
    if not header:
        raise BadInput(f"{path}: empty; expected a header line of column names")
    delimiter = delimiter_of(header)
    try:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
        records = [record for record in reader if any(value.strip() for value in record)]
    except csv.Error as error:
        raise BadInput(f"{path}: not a readable CSV ({error})") from None
    if not records:
        raise BadInput(f"{path}: no column names in its header line ({header.strip()!r})")
    columns = [name.strip() for name in records[0]]
    repeated = sorted({name for name in columns if name and columns.count(name) > 1})
    if repeated:
        raise BadInput(f"{path}: column(s) {', '.join(repeated)} appear more than once")
    rows = []
    for record in records[1:]:       # a short row's missing cells are blank
        record = record + [""] * (len(columns) - len(record))
        rows.append({name: value.strip() for name, value in zip(columns, record) if name})
    return [name for name in columns if name], rows
