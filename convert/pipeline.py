"""HF folder -> Orbax checkpoint: validate, then compute slabs on worker threads and stream them
into the writer in plan order (source file order, so reads are sequential).

Per slab: memory-map the tensor rows; reject NaN/Inf from the raw bits (FP8 NaN codes, non-finite
scales, bf16/f32 exponent all-ones); dequantise / cast; apply the `hf_mapping` transform. Slabs
of `JAX_MIN_BYTES` or more run through XLA on the CPU (fused dequantisation and fast
transposes); smaller ones through numpy. Both give the same bits as the spec formula: a float32
product rounded once to the output dtype.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import functools
import os
import shutil
import threading
import time
from collections import Counter, deque
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxmoe.quant.fp8 import scale_blocks
from jaxmoe.safetensors_io import CheckpointError

from convert import fp8, writer
from convert.plan import DEFAULT_MAX_SLAB, Plan, Slab, build_plan, validate
from convert.source import Source

JAX_MIN_BYTES = 4 << 20
_CPU = jax.devices("cpu")[0]
_FP8_TABLE = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
_EXP_MASK = {1: (0x7F, 0x7F), 2: (0x7F80, 0x7F80), 4: (0x7F800000, 0x7F800000)}
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32}


# ------------------------------------------------------------------------------ finiteness
_LOCAL = threading.local()


def _has_special(x: np.ndarray) -> bool:
    """NaN/Inf present, from the bits: fp8 e4m3fn NaN is s.1111.111, bf16/f16/f32 all-ones
    exponent (f16's is 0x7C00). Scans 4 MiB at a time through a per-thread buffer."""
    if x.size == 0:
        return False
    mask, val = _EXP_MASK[x.dtype.itemsize]
    if x.dtype == np.float16:
        mask = val = 0x7C00
    flat = np.asarray(x).reshape(-1).view(_UINT[x.dtype.itemsize])  # [n] as unsigned words
    buf = getattr(_LOCAL, "buf", None)
    if buf is None:
        buf = _LOCAL.buf = np.empty(4 << 20, np.uint8)
    step = buf.nbytes // flat.itemsize
    out = buf.view(flat.dtype)
    for i in range(0, flat.size, step):
        part = flat[i:i + step]
        if int(np.bitwise_and(part, mask, out=out[:part.size]).max()) == val:
            return True
    return False


def _check_source(x: np.ndarray, s: np.ndarray | None, slab: Slab, block) -> None:
    name = slab.entry.hf_name
    if s is not None:
        if not np.isfinite(s).all() or np.abs(s).max(initial=0) * 448.0 > np.finfo(np.float32).max:
            # overflow is possible: the exact per-block check names the element
            fp8.dequantize_rows(x, s, slab.row0, block, np.float32, name)
        if _has_special(x):
            fp8.dequantize_rows(x, s, slab.row0, block, np.float32, name)
    elif _has_special(x):
        fp8.check_finite(x, name, slab.row0)


# ------------------------------------------------------------------------------- kernels
@functools.partial(jax.jit, static_argnames=("block", "out_dtype"))
def _deq_kernel(u, s, block: tuple[int, int], out_dtype):
    """u uint8 [R, C] (e4m3 bits), s [ceil(R/br), ceil(C/bc)] -> out_dtype [R, C]: one fused
    gather-multiply-round (rounding inside the kernel; a separate cast pass costs 3x)."""
    x = jnp.asarray(_FP8_TABLE)[u.astype(jnp.int32)]  # [R, C] float32, exact e4m3 values
    return scale_blocks(x, s, block, jnp).astype(out_dtype)


def _dequant_jax(x: np.ndarray, s: np.ndarray, block, out_dtype) -> jax.Array:
    return _deq_kernel(jax.device_put(x.view(np.uint8), _CPU), jax.device_put(s, _CPU),
                       tuple(block), np.dtype(out_dtype))


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def _cast_kernel(x, out_dtype):
    return x.astype(out_dtype)


def compute_slab(src: Source, plan: Plan, slab: Slab) -> np.ndarray:
    """The slab's data in jaxmoe layout and the array's dtype."""
    try:
        return _compute(src, plan, slab)
    except CheckpointError as err:
        f = src.file_of(slab.entry.hf_name)
        raise CheckpointError(f"{src.path}/{f}: {err}") from None


def _compute(src: Source, plan: Plan, slab: Slab) -> np.ndarray:
    e = slab.entry
    if slab.kind != "value":
        return _kept_fp8(src, slab)
    out_dtype = np.dtype(plan.arrays[slab.array].dtype)
    x = src.read(e.hf_name, slab.rows)
    s = None
    if slab.scale:
        s = np.asarray(src.read(slab.scale), np.float32)
        if slab.rows:
            br = src.fp8_block[0]
            s = s[slab.rows[0] // br:-(-slab.rows[1] // br)]
    _check_source(x, s, slab, src.fp8_block)
    big = slab.out_bytes >= JAX_MIN_BYTES
    if s is not None:
        y = (_dequant_jax(x, s, src.fp8_block, out_dtype) if big else
             fp8.dequantize_rows(x, s, slab.row0, src.fp8_block,
                                 out_dtype, e.hf_name))
    elif x.dtype == out_dtype and e.transform == "copy":
        return x  # pass-through: written straight from the memory map
    elif big:
        y = _cast_kernel(jax.device_put(np.asarray(x), _CPU), np.dtype(out_dtype))
    else:
        y = np.asarray(x).astype(out_dtype)
    return np.asarray(e.to_jaxmoe(y, plan.cfg))


def _kept_fp8(src: Source, slab: Slab) -> np.ndarray:
    """--keep-fp8: the e4m3 weight as published (NaN codes refused) or its float32 scales
    (finite, positive), written unchanged."""
    if slab.kind == "fp8":
        x = src.read(slab.entry.hf_name)
        if _has_special(x):
            s = np.asarray(src.read(slab.scale), np.float32)
            fp8.dequantize_rows(x, s, 0, src.fp8_block, np.float32, slab.entry.hf_name)
        return np.asarray(x)
    s = np.asarray(src.read(slab.scale), np.float32)
    if not (np.isfinite(s).all() and (s > 0).all()):
        bad = tuple(int(i) for i in np.argwhere(~(np.isfinite(s) & (s > 0)))[0])
        raise CheckpointError(f"tensor {slab.scale!r}: {s[bad]} at {list(bad)}; expected "
                              "finite positive scales")
    return s


# ---------------------------------------------------------------------------- orchestration
@dataclasses.dataclass
class Stats:
    tensors: int = 0
    slabs: int = 0
    skipped: int = 0
    src_bytes: int = 0
    out_bytes: int = 0
    params: int = 0
    seconds: float = 0.0
    max_slab_bytes: int = 0


def convert(hf_dir, out_dir, *, dtype: str | None = None, resume: bool = False,
            overwrite: bool = False, workers: int = 2, mtp="auto",
            max_slab_bytes: int = DEFAULT_MAX_SLAB, batch_bytes: int = writer.DEFAULT_BATCH,
            progress: Callable[..., Callable[[int, bool], None]] | None = None,
            keep_fp8: bool = False) -> Stats:
    """Convert; returns Stats. `progress(total_bytes, done_bytes, tensors, done_tensors)`
    returns a per-slab callback `tick(slab_bytes, tensor_finished)`. keep_fp8: FP8 weights
    stay e4m3 with their scales (see `plan.build_plan`)."""
    t0 = time.perf_counter()
    src = Source(hf_dir)
    plan = build_plan(src, dtype, mtp, max_slab_bytes, keep_fp8=keep_fp8)
    validate(src, plan)
    tmp = writer.prepare_output(out_dir, resume, overwrite, plan.fingerprint, hf_dir)
    if writer.sealed(tmp):  # killed between sealing and the rename
        writer.install(tmp, out_dir)
        return Stats(tensors=len({s.entry.hf_name for s in plan.slabs}),
                     skipped=len(plan.slabs), params=plan.num_params,
                     seconds=time.perf_counter() - t0)
    done = writer.read_journal(tmp)
    todo = [s for s in plan.slabs if s.key not in done]
    st = Stats(tensors=len({s.entry.hf_name for s in plan.slabs}), slabs=len(todo),
               skipped=len(plan.slabs) - len(todo), params=plan.num_params,
               max_slab_bytes=plan.max_slab_bytes)
    remaining = Counter(s.entry.hf_name for s in todo)
    tick = progress(plan.total_out_bytes, sum(s.out_bytes for s in plan.slabs if s.key in done),
                    st.tensors, st.tensors - len(remaining)) if progress else None
    delay = float(os.environ.get("JAXMOE_CONVERT_SLAB_DELAY", "0"))  # tests: a window to kill
    # Slabs computed ahead of the writer: at most 2 per worker and `ahead` bytes, so workers
    # keep busy while a commit is flushing without holding more than that.
    ahead = max(batch_bytes // 2, 2 * plan.max_slab_bytes)
    w = writer.Writer(tmp, plan, workers, batch_bytes)
    try:
        with cf.ThreadPoolExecutor(max(1, workers)) as pool:
            queue: deque = deque()
            it = iter(todo)
            nxt = next(it, None)
            while queue or nxt is not None:
                while nxt is not None and (not queue or (
                        len(queue) < 2 * max(1, workers) and
                        sum(q.out_bytes for q, _ in queue) + nxt.out_bytes <= ahead)):
                    queue.append((nxt, pool.submit(compute_slab, src, plan, nxt)))
                    nxt = next(it, None)
                s, fut = queue.popleft()
                data = fut.result()
                w.write(s, data)
                del data
                st.src_bytes += s.src_bytes
                st.out_bytes += s.out_bytes
                remaining[s.entry.hf_name] -= 1
                if tick:
                    tick(s.out_bytes, remaining[s.entry.hf_name] == 0)
                if delay:
                    time.sleep(delay)
        w.flush()
    except CheckpointError:
        w.abort()
        shutil.rmtree(tmp, ignore_errors=True)  # bad source data: nothing to resume from
        raise
    w.close()
    writer.seal(tmp, plan, hf_dir)
    writer.install(tmp, out_dir)
    st.seconds = time.perf_counter() - t0
    return st
