"""A small memory-mapped safetensors reader/writer that understands FP8 (via ml_dtypes).

The format: 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}}, then the raw bytes. Reading maps the file, so
a tensor costs memory only while it is used; every structural problem raises `CheckpointError`
naming the file and tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any, Iterable, Mapping

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
    """A missing, truncated, corrupt or inconsistent checkpoint file or tensor."""


class SafetensorsFile:
    """Lazy, memory-mapped view of one .safetensors file."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise CheckpointError(f"{self.path}: file not found")
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 * 2**20:
                raise CheckpointError(f"{self.path}: corrupt header length {n} (file has {size} bytes)")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt header (not a JSON object)")
        self.metadata = header.pop("__metadata__", {}) or {}
        self.header: dict[str, dict] = header
        self._base = 8 + n
        data_len = size - self._base
        spans = []
        for name, info in header.items():
            self._check_entry(name, info)
            b, e = info["data_offsets"]
            want = int(np.prod(info["shape"], dtype=np.int64)) * DTYPES[info["dtype"]].itemsize
            if e - b != want:
                raise CheckpointError(f"{self.path}: tensor {name!r} shape {info['shape']} "
                                      f"{info['dtype']} needs {want} bytes, header gives {e - b}")
            if e > data_len:
                raise CheckpointError(f"{self.path}: truncated: tensor {name!r} ends at byte "
                                      f"{self._base + e}, file has {size}")
            spans.append((b, e, name))
        spans.sort()
        for (_, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
            if b1 < e0 and e1 > b1:
                raise CheckpointError(f"{self.path}: corrupt header: tensors {n0!r} and {n1!r} overlap")
        self._mm = None

    def _check_entry(self, name: str, info) -> None:
        def bad(why):
            raise CheckpointError(f"{self.path}: corrupt header entry for tensor {name!r}: {why}")

        if not isinstance(info, dict):
            bad("not an object")
        if info.get("dtype") not in DTYPES:
            bad(f"unsupported dtype {info.get('dtype')!r}")
        shape = info.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            bad(f"shape {shape!r} is not a list of non-negative integers")
        off = info.get("data_offsets")
        if (not isinstance(off, list) or len(off) != 2 or not all(isinstance(o, int) for o in off)
                or not 0 <= off[0] <= off[1]):
            bad(f"data_offsets {off!r} is not [begin, end] with 0 <= begin <= end")

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self.header[name]["dtype"]]

    def nbytes(self, name: str) -> int:
        b, e = self.header[name]["data_offsets"]
        return e - b

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory-mapped array (no copy)."""
        if name not in self.header:
            raise CheckpointError(f"{self.path}: no tensor {name!r}")
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        info = self.header[name]
        b, e = info["data_offsets"]
        raw = self._mm[self._base + b:self._base + e]
        return raw.view(DTYPES[info["dtype"]]).reshape(info["shape"])  # [bytes] -> the header's shape

    def close(self):
        self._mm = None


def header_bytes(specs: Iterable[tuple[str, Any, tuple]], metadata: Mapping[str, str] | None = None,
                 where: str = "safetensors") -> tuple[bytes, int]:
    """(a file's first bytes: the 8-byte header length and the JSON header, padded so tensor
    data stays 8-byte aligned; the data's length) for tensors (name, dtype, shape) in this order."""
    header: dict = {}
    off = 0
    for name, dt, shape in specs:
        dt = np.dtype(dt)
        if dt not in NAMES:
            raise CheckpointError(f"{where}: cannot store tensor {name!r} of dtype {dt}")
        n = math.prod(shape) * dt.itemsize
        header[name] = {"dtype": NAMES[dt], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    if metadata:
        header["__metadata__"] = dict(metadata)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob, off


def write(path: str | os.PathLike, tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
          metadata: Mapping[str, str] | None = None) -> int:
    """Write tensors (in the given order) to `path`; returns the bytes written."""
    items = [(n, np.asarray(a)) for n, a in (tensors.items() if isinstance(tensors, Mapping)
                                             else tensors)]
    head, size = header_bytes(((n, a.dtype, a.shape) for n, a in items), metadata, str(path))
    with open(path, "wb") as f:
        f.write(head)
        for _, a in items:
            f.write(np.ascontiguousarray(a).tobytes())
    return len(head) + size
