"""Pallas bodies of the permute kernels: a row gather (tokens -> expert-sorted rows, and every transpose
that is a gather), the weighted combine (sorted rows -> tokens) and its routing-weight gradient.

Nothing here scatters: each output row reads its inputs, so no atomics and no revisited outputs.

GPU (Pallas Triton): the source is one whole-array ref, indexed with a vector of row ids and a
column slice (`ref[ids, pl.ds(c, bd)]`), i.e. a pointer gather; columns are tiled by `bd` (a power of two).
TPU (Mosaic): each grid step first copies its slice of row ids from HBM into an SMEM scratch (so the id
array never has to fit SMEM whole); then each row is one DMA from HBM (`memory_space=ANY`) into the VMEM
output block (or a [K, bt, D] VMEM buffer), all started before any is waited on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


# ------------------------------------------------------------------------------------- GPU / interpret
def gather_kernel(idx_ref, scale_ref, x_ref, o_ref, *, bd: int):
    """o[r, cols] = x[idx[r], cols] * scale[r] (zero where idx < 0); grid (rows/bm, D/bd)."""
    idx = idx_ref[...]
    s = jnp.where(idx >= 0, scale_ref[...], 0.0)
    rows = x_ref[jnp.maximum(idx, 0), pl.ds(pl.program_id(1) * bd, bd)]  # [bm, bd] gather
    o_ref[...] = (rows.astype(jnp.float32) * s[:, None]).astype(o_ref.dtype)


def combine_kernel(pos_ref, w_ref, y_ref, o_ref, *, bd: int, k: int):
    """o[t, cols] = sum_k w[t, k] * y[pos[t, k], cols], float32 accumulation; grid (T/bt, D/bd)."""
    cols = pl.ds(pl.program_id(1) * bd, bd)
    acc = jnp.zeros(o_ref.shape, jnp.float32)
    for kk in range(k):
        acc += y_ref[pos_ref[:, kk], cols].astype(jnp.float32) * w_ref[:, kk][:, None]
    o_ref[...] = acc.astype(o_ref.dtype)


def combine_dw_kernel(pos_ref, dout_ref, y_ref, dw_ref, *, bd: int, k: int, d: int):
    """dw[t, k] = sum_cols dout[t, cols] * y[pos[t, k], cols]; grid (T/bt,)."""
    bt = dw_ref.shape[0]
    for kk in range(dw_ref.shape[1]):
        if kk >= k:
            dw_ref[:, kk] = jnp.zeros((bt,), jnp.float32)
            continue
        p = pos_ref[:, kk]

        def body(c, acc, p=p):
            cols = pl.ds(c * bd, bd)
            return acc + (dout_ref[:, cols].astype(jnp.float32)
                          * y_ref[p, cols].astype(jnp.float32)).sum(-1)

        dw_ref[:, kk] = jax.lax.fori_loop(0, d // bd, body, jnp.zeros((bt,), jnp.float32))


# ------------------------------------------------------------------------------------------------- TPU
def _dma_rows(src_hbm, dst, idx_of, n: int, sem):
    """Start n single-row DMAs src[idx_of(r)] -> dst(r), then wait for all of them."""
    def start(r, c):
        pltpu.make_async_copy(src_hbm.at[pl.ds(idx_of(r), 1)], dst(r), sem).start()
        return c

    def wait(r, c):
        pltpu.make_async_copy(src_hbm.at[pl.ds(0, 1)], dst(0), sem).wait()
        return c

    jax.lax.fori_loop(0, n, start, 0)
    jax.lax.fori_loop(0, n, wait, 0)


def _load_ids(ids_hbm, ids_smem, sem):
    n = ids_smem.shape[0]
    cp = pltpu.make_async_copy(ids_hbm.at[0, pl.ds(pl.program_id(0) * n, n)], ids_smem, sem)
    cp.start()
    cp.wait()


def gather_kernel_tpu(ids_hbm, scale_ref, x_hbm, o_ref, idx_ref, sem):
    """ids [1, R] in HBM (negative ids already carry scale 0), scale [bm, 1], o [bm, D] in VMEM."""
    bm = o_ref.shape[0]
    _load_ids(ids_hbm, idx_ref, sem)
    _dma_rows(x_hbm, lambda r: o_ref.at[pl.ds(r, 1)], lambda r: jnp.maximum(idx_ref[r], 0), bm, sem)
    o_ref[...] = (o_ref[...].astype(jnp.float32) * scale_ref[...]).astype(o_ref.dtype)


def _gather_k(pos_ref, y_hbm, buf, sem, k: int):
    """buf[kk, r] = y[pos[r*k + kk]] for the bt tokens of this block (pos flat in SMEM)."""
    bt = buf.shape[1]
    # lax.rem/div, not %, //: i >= 0, and Mosaic lowers jnp's sign fix-up only with a known chip
    _dma_rows(y_hbm, lambda i: buf.at[jax.lax.rem(i, k), pl.ds(jax.lax.div(i, k), 1)],
              lambda i: pos_ref[i], bt * k, sem)


def combine_kernel_tpu(pos_hbm, w_ref, y_hbm, o_ref, pos_ref, buf, sem, *, k: int):
    _load_ids(pos_hbm, pos_ref, sem)
    _gather_k(pos_ref, y_hbm, buf, sem, k)
    acc = jnp.zeros(o_ref.shape, jnp.float32)
    for kk in range(k):
        acc += buf[kk].astype(jnp.float32) * w_ref[:, pl.ds(kk, 1)]
    o_ref[...] = acc.astype(o_ref.dtype)


def combine_dw_kernel_tpu(pos_hbm, dout_ref, y_hbm, dw_ref, pos_ref, buf, sem, *, k: int):
    _load_ids(pos_hbm, pos_ref, sem)
    _gather_k(pos_ref, y_hbm, buf, sem, k)
    dout = dout_ref[...].astype(jnp.float32)
    for kk in range(k):
        dw_ref[:, pl.ds(kk, 1)] = (dout * buf[kk].astype(jnp.float32)).sum(-1, keepdims=True)
