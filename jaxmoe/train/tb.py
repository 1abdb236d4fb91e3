"""A dependency-free TensorBoard scalar writer.

An event file is a TFRecord stream of `tensorflow.Event` protos: each record is
len (u64 LE) | masked crc32c(len) (u32) | data | masked crc32c(data) (u32). The two protos
used here are written by hand in the protobuf wire format:

    Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
    Summary { repeated Value value = 1; }   Value { string tag = 1; float simple_value = 2; }

A resumed run starts a new file and first writes a SessionLog START event at the resume step
(`Event.session_log = 7 { status = START (1) }`), which tells TensorBoard to discard the older events
after that step (what tensorboardX's `purge_step` does).
"""

from __future__ import annotations

import os
import socket
import struct
import time

_CRC_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _CRC_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(num: int, wire: int) -> bytes:
    return _varint((num << 3) | wire)


def _bytes_field(num: int, payload: bytes) -> bytes:
    return _field(num, 2) + _varint(len(payload)) + payload


def event(step: int, wall_time: float, *, scalars: dict | None = None,
          file_version: str | None = None, session_start: bool = False) -> bytes:
    out = _field(1, 1) + struct.pack("<d", wall_time) + _field(2, 0) + _varint(step)
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if scalars:
        values = b"".join(_bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5)
                                       + struct.pack("<f", float(v)))
                          for tag, v in scalars.items())
        out += _bytes_field(5, values)
    if session_start:
        out += _bytes_field(7, _field(1, 0) + _varint(1))
    return out


def record(data: bytes) -> bytes:
    n = struct.pack("<Q", len(data))
    return n + struct.pack("<I", masked_crc(n)) + data + struct.pack("<I", masked_crc(data))


def read_records(path: str) -> list[bytes]:
    """The data of each record, CRCs checked (tests; a torn tail is dropped)."""
    out = []
    with open(path, "rb") as f:
        buf = f.read()
    i = 0
    while i + 12 <= len(buf):
        n = struct.unpack("<Q", buf[i:i + 8])[0]
        if struct.unpack("<I", buf[i + 8:i + 12])[0] != masked_crc(buf[i:i + 8]):
            raise ValueError(f"{path}: bad length crc at {i}")
        data = buf[i + 12:i + 12 + n]
        if len(data) < n or i + 16 + n > len(buf):
            break
        if struct.unpack("<I", buf[i + 12 + n:i + 16 + n])[0] != masked_crc(data):
            raise ValueError(f"{path}: bad data crc at {i}")
        out.append(data)
        i += 16 + n
    return out


class EventWriter:
    def __init__(self, logdir: str, purge_step: int | None = None):
        os.makedirs(logdir, exist_ok=True)
        now = time.time()
        name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
        self.f = open(os.path.join(logdir, name), "ab")
        self._write(event(0, now, file_version="brain.Event:2"))
        if purge_step:
            self._write(event(purge_step, now, session_start=True))

    def _write(self, data: bytes) -> None:
        self.f.write(record(data))

    def scalars(self, step: int, values: dict) -> None:
        self._write(event(step, time.time(), scalars=values))
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


def _fields(buf: bytes):
    """(field number, wire type, value) of a protobuf message (types 0, 1, 2, 5)."""
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _read_varint(buf, i)
        elif wire == 1:
            v, i = buf[i:i + 8], i + 8
        elif wire == 5:
            v, i = buf[i:i + 4], i + 4
        elif wire == 2:
            n, i = _read_varint(buf, i)
            v, i = buf[i:i + n], i + n
        else:
            raise ValueError(f"wire type {wire} not supported")
        yield num, wire, v


def parse_event(data: bytes) -> tuple[int, dict[str, float]]:
    """(step, {tag: simple_value}) of one Event record (tests and tools)."""
    step, scalars = 0, {}
    for num, _, v in _fields(data):
        if num == 2:
            step = v
        elif num == 5:
            for vnum, _, value in _fields(v):
                if vnum == 1:
                    f = dict((n, x) for n, _, x in _fields(value))
                    if 2 in f:
                        scalars[f[1].decode()] = struct.unpack("<f", f[2])[0]
    return step, scalars
