"""Orbax checkpoint -> Hugging Face folder (sharded bf16 safetensors, index.json, config.json).

Walks `hf_mapping.entries(cfg)` in checkpoint order, reads each published tensor's slab (or row
block) from the stored arrays, applies the inverse transform and streams it into the current
shard, so memory stays at one slab. Like the converter it writes `HF_DIR.partial/` and renames
it into place at the end. Router `e_score_correction_bias` stays float32 (as published).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time

import ml_dtypes
import numpy as np

from jaxmoe import hf_mapping, orbax_io, paths
from jaxmoe.safetensors_io import CheckpointError, header_bytes

from convert import writer
from convert.fp8 import dequantize_rows
from convert.pipeline import Stats
from convert.plan import DEFAULT_MAX_SLAB, hf_shape

F32_NAMES = ("e_score_correction_bias",)
# what export writes into HF_DIR (and so what an interrupted HF_DIR.partial may hold)
_EXPORT_FILE = re.compile(r"config\.json|model(-\d+-of-\d+)?\.safetensors(\.index\.json)?")


class ShardedWriter:
    """Streams tensors into safetensors shards whose layout (names, dtypes, shapes) is known up
    front: `plan` assigns them to shards, `write` appends each tensor's bytes in order."""

    def __init__(self, folder: str, specs: list[tuple[str, np.dtype, tuple]], max_shard_bytes: int,
                 count_digits: int = 5):
        """`count_digits`: width of the shard count in the file names (the release: 6)."""
        self.folder, self.specs = folder, specs
        groups, cur, size = [], [], 0
        for name, dt, shape in specs:
            n = math.prod(shape) * np.dtype(dt).itemsize
            if cur and size + n > max_shard_bytes:
                groups.append(cur)
                cur, size = [], 0
            cur.append((name, np.dtype(dt), tuple(shape)))
            size += n
        groups.append(cur)
        total = len(groups)
        self.files = ([f"model-{i + 1:05d}-of-{total:0{count_digits}d}.safetensors"
                       for i in range(total)]
                      if total > 1 else ["model.safetensors"])
        self.groups = groups
        self.weight_map = {n: f for f, g in zip(self.files, groups) for n, _, _ in g}
        self.total_size = sum(math.prod(s) * d.itemsize for g in groups for _, d, s in g)
        self._gi, self._ti, self._f, self._left = -1, 0, None, 0

    def _open_next(self) -> None:
        if self._f is not None:
            self._f.close()
        self._gi += 1
        self._ti = 0
        self._f = open(os.path.join(self.folder, self.files[self._gi]), "wb")
        self._f.write(header_bytes(self.groups[self._gi], {"format": "pt"})[0])

    def begin(self, name: str) -> None:
        """Start tensor `name` (the next one in order)."""
        if self._left:
            raise RuntimeError(f"previous tensor short by {self._left} bytes")
        if self._gi < 0 or self._ti >= len(self.groups[self._gi]):
            self._open_next()
        want, dt, shape = self.groups[self._gi][self._ti]
        if name != want:
            raise RuntimeError(f"expected tensor {want}, got {name}")
        self._left = math.prod(shape) * dt.itemsize
        self._dtype = dt
        self._ti += 1

    def write(self, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a, self._dtype)
        self._f.write(memoryview(a.view(np.uint8).reshape(-1)))  # the array's bytes, [nbytes]
        self._left -= a.nbytes

    def close(self) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
        if len(self.files) > 1:
            self.write_index()

    def write_index(self) -> None:
        index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
        with open(os.path.join(self.folder, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)


def _prepare_output(out: str, overwrite: bool) -> str:
    """Check HF_DIR (replaceable only with `overwrite`, and only if it is an HF checkpoint or
    empty) and clear a stale HF_DIR.partial (only if it holds nothing but export's files)."""
    if os.path.isdir(out) and os.listdir(out):
        names = set(os.listdir(out))
        if "config.json" not in names or not any(_EXPORT_FILE.fullmatch(n) and n != "config.json"
                                                 for n in names):
            raise CheckpointError(
                f"{out}: holds files that are not a Hugging Face checkpoint "
                f"({writer.listing(out)}; no config.json + model*.safetensors); " + (
                    "--overwrite only replaces an HF checkpoint or an empty folder, so "
                    if overwrite else "") + "choose another output folder (or empty this one)")
        if not overwrite:
            raise CheckpointError(f"{out}: already holds a Hugging Face checkpoint; pass "
                                  "--overwrite to replace it")
    tmp = out + writer.PARTIAL
    if os.path.lexists(tmp):
        if not os.path.isdir(tmp):
            raise CheckpointError(f"{tmp}: is a file, not the folder of an interrupted export; "
                                  "move it away")
        if not all(_EXPORT_FILE.fullmatch(n) for n in os.listdir(tmp)):
            raise CheckpointError(f"{tmp}: holds files that are not an interrupted export "
                                  f"({writer.listing(tmp)}); move it away")
        shutil.rmtree(tmp)  # an interrupted export: nothing there to keep
    os.makedirs(tmp)
    return tmp


def export(orbax_dir, hf_dir, *, dtype: str = "bfloat16", max_shard_bytes: int = 5 << 30,
           overwrite: bool = False, progress=None, max_block_bytes: int = DEFAULT_MAX_SLAB) -> Stats:
    t0 = time.perf_counter()
    out = writer.check_output_path(hf_dir, orbax_dir)
    meta = orbax_io.read_marker(orbax_dir)
    cfg = orbax_io.config_of(meta)
    stored = set(orbax_io.stored_names(orbax_dir))
    if cfg.num_nextn_predict_layers and orbax_io.param_name(("mtp", 0, "eh_proj_UD")) not in stored:
        cfg = cfg.replace(num_nextn_predict_layers=0)
    tmp = _prepare_output(out, overwrite)
    arrays = {}
    specs, work = [], []
    kept = meta.get("fp8") or {}  # --keep-fp8: e4m3 [out, in] + scales, dequantised here
    for e in hf_mapping.entries(cfg):
        name = orbax_io.param_name(e.path)
        if name in kept:
            for part in (".q", ".scale_inv"):
                if name + part not in arrays:
                    arrays[name + part] = orbax_io.open_array(orbax_dir, name + part)
            shape = tuple(arrays[name + ".q"].shape[len(e.index):])
            dt = np.dtype(np.float32) if dtype == "float32" else np.dtype(ml_dtypes.bfloat16)
            specs.append((e.hf_name, dt, shape))
            work.append((e, name, shape, shape[0]))
            continue
        if name not in stored:
            raise CheckpointError(f"{orbax_dir}: parameter {name} (for {e.hf_name}) missing")
        if name not in arrays:
            arrays[name] = orbax_io.open_array(orbax_dir, name)
        arr = arrays[name]
        shape = hf_shape(e.transform, tuple(arr.shape[len(e.index):]), cfg)
        dt = np.dtype(np.float32) if (dtype == "float32" or e.hf_name.endswith(F32_NAMES)) \
            else np.dtype(ml_dtypes.bfloat16)
        specs.append((e.hf_name, dt, shape))
        row_bytes = math.prod(shape[1:]) * 4
        step = shape[0] if e.transform not in ("copy", "T") or len(shape) != 2 else \
            max(1, max_block_bytes // max(row_bytes, 1))
        work.append((e, name, shape, step))
    w = ShardedWriter(tmp, specs, max_shard_bytes)
    plan_bytes = w.total_size
    st = Stats(tensors=len(specs), slabs=0, params=sum(math.prod(s) for _, _, s in specs))
    tick = progress(plan_bytes, 0, len(specs), 0) if progress else None
    for e, name, shape, step in work:
        w.begin(e.hf_name)
        if name in kept:
            q = np.asarray(arrays[name + ".q"][tuple(e.index)].read().result())
            s = np.asarray(arrays[name + ".scale_inv"][tuple(e.index)].read().result())
            w.write(dequantize_rows(q, s, 0, tuple(kept[name]["block"]), np.float32,
                                    e.hf_name))
            st.src_bytes += q.nbytes + s.nbytes
            nbytes = math.prod(shape) * w._dtype.itemsize
            st.out_bytes += nbytes
            st.slabs += 1
            if tick:
                tick(nbytes, True)
            continue
        arr = arrays[name]
        for r0 in range(0, shape[0], step):
            r1 = min(r0 + step, shape[0])
            tail = () if step >= shape[0] else (
                (slice(r0, r1),) if e.transform == "copy" else (slice(None), slice(r0, r1)))
            a = np.asarray(arr[tuple(e.index) + tail].read().result())
            h = e.to_hf(a, cfg)
            w.write(h)
            st.src_bytes += a.nbytes
        nbytes = math.prod(shape) * w._dtype.itemsize
        st.out_bytes += nbytes
        st.slabs += 1
        if tick:
            tick(nbytes, True)
    w.close()
    hf_cfg = dict(cfg.to_hf_config())
    hf_cfg["torch_dtype"] = hf_cfg["dtype"] = dtype
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)
    paths.replace_folder(tmp, out)
    st.seconds = time.perf_counter() - t0
    return st
