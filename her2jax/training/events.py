"""TensorBoard event files of scalars, written with the standard library alone.

A training process imports neither TensorFlow's summary API nor tensorboardX for this (the
latter imports torch where it is installed: 2.8 s in each training process of a venv that has
it). An event file is a sequence of records, each

    length (uint64, little-endian), masked CRC-32C of those 8 bytes (uint32),
    data, masked CRC-32C of the data (uint32)

whose data is an `Event` protocol buffer (tensorflow/core/util/event.proto): first one holding
only `file_version`, then one per scalar with `wall_time`, `step` and a `Summary` of one
`Value` (`tag`, `simple_value`), which TensorBoard's scalar dashboard reads. The few protocol
buffer fields are encoded here by hand.
"""
from __future__ import annotations

import itertools
import os
import socket
import struct
import time

from etils import epath

FILE_VERSION = "brain.Event:2"
_files = itertools.count()      # a second writer of this process in the same second: its own file


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1   # Castagnoli, reflected
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The record format's checksum: CRC-32C rotated right by 15 bits plus a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    if value < 0:
        raise ValueError(f"negative varint {value}")
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _key(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _key(number, 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, *, step: int | None = None, file_version: str | None = None,
                 scalar: tuple[str, float] | None = None) -> bytes:
    """An `Event`: wall_time (field 1, double), step (2, int64), file_version (3, string),
    summary (5) holding one value: tag (1, string) and simple_value (2, float)."""
    data = _key(1, 1) + struct.pack("<d", wall_time)
    if step is not None:
        data += _key(2, 0) + _varint(step)
    if file_version is not None:
        data += _length_delimited(3, file_version.encode())
    if scalar is not None:
        tag, value = scalar
        summary_value = _length_delimited(1, tag.encode()) + _key(2, 5) + struct.pack("<f", value)
        data += _length_delimited(5, _length_delimited(1, summary_value))
    return data


def encode_record(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return (length + struct.pack("<I", masked_crc32c(length)) + data
            + struct.pack("<I", masked_crc32c(data)))


class EventWriter:
    """Appends scalars to a new event file in `folder` (created if needed; a local folder: a run
    in a bucket writes its events locally and copies them up, see `run_log`)."""

    def __init__(self, folder: str | epath.Path):
        folder = epath.Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
                f"{os.getpid()}.{next(_files)}")
        self.path = str(folder / name)
        self._file = (folder / name).open("ab")
        self._file.write(encode_record(encode_event(time.time(), file_version=FILE_VERSION)))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._file.write(encode_record(encode_event(time.time(), step=int(step),
                                                    scalar=(tag, float(value)))))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()
