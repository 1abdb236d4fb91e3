"""The source Hugging Face folder: every shard's header, validated up front, and per-tensor
memory maps that live only while one slab is being converted (so resident pages do not pile up).

Name resolution (index.json or every *.safetensors) and config.json are `jaxmoe.hf_io.HFCheckpoint`.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from jaxmoe.hf_io import HFCheckpoint
from jaxmoe.safetensors_io import DTYPES, CheckpointError

FLOAT_DTYPES = ("F32", "BF16", "F16")
FP8_DTYPE = "F8_E4M3"


class Source:
    def __init__(self, path):
        self.ckpt = HFCheckpoint(path)
        self.path = self.ckpt.path
        self.config = self.ckpt.config_json
        self.files = {f: self.ckpt.file(f) for f in sorted(set(self.ckpt.weight_map.values()))}
        self.fp8_block = self._fp8_block()

    def _fp8_block(self) -> tuple[int, int] | None:
        qc = self.config.get("quantization_config")
        if not qc:
            return None
        where = f"{self.ckpt.config_path}: quantization_config"
        if qc.get("quant_method") != "fp8":
            raise CheckpointError(f"{where}.quant_method is {qc.get('quant_method')!r}, "
                                  "expected 'fp8'")
        if qc.get("fmt", "e4m3") != "e4m3":
            raise CheckpointError(f"{where}.fmt is {qc.get('fmt')!r}, expected 'e4m3'")
        b = qc.get("weight_block_size")
        if not (isinstance(b, (list, tuple)) and len(b) == 2 and all(isinstance(x, int) and x > 0
                                                                   for x in b)):
            raise CheckpointError(f"{where}.weight_block_size is {b!r}, expected [rows, cols] "
                                  "(e.g. [128, 128])")
        return (b[0], b[1])

    # ------------------------------------------------------------------------------ headers
    def names(self) -> list[str]:
        return list(self.ckpt.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.ckpt.weight_map

    def file_of(self, name: str) -> str:
        return self.ckpt.weight_map[name]

    def info(self, name: str) -> dict:
        """{dtype, shape, data_offsets}; raises naming the file when the index lies."""
        if name not in self.ckpt.weight_map:
            raise CheckpointError(f"{self.path}: tensor {name!r} missing from the checkpoint")
        fname = self.ckpt.weight_map[name]
        f = self.files[fname]
        if name not in f.header:
            raise CheckpointError(f"{f.path}: tensor {name!r} listed in "
                                  "model.safetensors.index.json is not in the file")
        return f.header[name]

    def dtype_name(self, name: str) -> str:
        return self.info(name)["dtype"]

    def shape(self, name: str) -> tuple:
        return tuple(self.info(name)["shape"])

    def nbytes(self, name: str) -> int:
        b, e = self.info(name)["data_offsets"]
        return e - b

    def sort_key(self, name: str) -> tuple:
        return (self.file_of(name), self.info(name)["data_offsets"][0])

    def is_fp8(self, name: str) -> bool:
        return self.dtype_name(name) == FP8_DTYPE

    # ------------------------------------------------------------------------------ reading
    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Rows [r0, r1) of the tensor (all of it if None) as a read-only memory map."""
        info = self.info(name)
        f = self.files[self.file_of(name)]
        dt = DTYPES[info["dtype"]]
        shape = tuple(info["shape"])
        start = info["data_offsets"][0]
        if rows is not None:
            row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dt.itemsize
            start += rows[0] * row_bytes
            shape = (rows[1] - rows[0],) + shape[1:]
        if int(np.prod(shape, dtype=np.int64)) == 0:
            return np.zeros(shape, dt)
        return np.memmap(f.path, dtype=dt, mode="r", offset=f._base + start, shape=shape)

    # ---------------------------------------------------------------------------- identity
    def fingerprint(self) -> str:
        """Hash of config.json, every shard header and size: a resumed conversion must come
        from the same bytes."""
        h = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode())
        for fname, f in self.files.items():
            h.update(fname.encode())
            h.update(str(os.path.getsize(f.path)).encode())
            h.update(json.dumps(f.header, sort_keys=True).encode())
        return h.hexdigest()

    def source_dtype(self, names) -> str:
        """Keep the source's precision: FP8 -> bfloat16, else the embedding's dtype."""
        if any(self.is_fp8(n) for n in names if n in self):
            return "bfloat16"
        emb = "model.embed_tokens.weight"
        d = self.dtype_name(emb) if emb in self else "F32"
        return {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(d, "float32")
