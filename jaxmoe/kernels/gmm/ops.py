"""Grouped matmul on expert-sorted rows, with a custom VJP.

    y = gmm(lhs [R, Kd], rhs [E, Kd, N], group_rows [E])   # rows of group e times rhs[e] -> [R, N]

Backward: d lhs = gmm(dy, rhs, transpose_rhs=True) and d rhs = tgmm(lhs, dy) (per-group lhs.T @ dy),
both grouped (no dense [E, ...] intermediate).

Lowerings: GPU = the Pallas-Triton kernels of kernel.py (group_rows must be multiples of the row tile
bm: `permute.make_plan(align=bm)`); TPU = jax's megablox `gmm` / `tgmm` (Mosaic), where groups may have
any size (rows after the last group are folded into it: they are zero padding). Interpret mode runs
either on the CPU.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxmoe.kernels import common
from jaxmoe.kernels.gmm.kernel import BlockSizes, gmm_kernel, tgmm_kernel

# the module (the package re-exports a function of the same name)
megablox = importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")


def tile_metadata(group_rows: jax.Array, num_rows: int, bm: int):
    """(tile_expert [R/bm], n_used [1], tile_start [E+1]) for row tiles of bm rows."""
    E = group_rows.shape[0]
    ts = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(group_rows // bm).astype(jnp.int32)])
    te = jnp.searchsorted(ts[1:], jnp.arange(num_rows // bm), side="right")
    return jnp.minimum(te, E - 1).astype(jnp.int32), ts[-1:], ts


def _gpu_blocks(block: BlockSizes, kdim: int, n: int, interpret: bool) -> tuple[int, int]:
    bk, bn = common.pow2_divisor(kdim, block.bk), common.pow2_divisor(n, block.bn)
    if not interpret and min(block.bm, bk, bn) < 16:
        raise ValueError(f"Triton dot tiles must be >= 16: bm={block.bm}, bk={bk}, bn={bn} "
                         f"(contraction {kdim}, output width {n})")
    return bk, bn


def _tpu_groups(group_rows, num_rows):
    return group_rows.at[-1].add(num_rows - group_rows.sum()).astype(jnp.int32)


def _zero_tail(y, group_rows):
    """Rows past the last group (folded into it for megablox) are zero, as on the GPU path."""
    return jnp.where((jnp.arange(y.shape[0]) < group_rows.sum())[:, None], y, jnp.zeros((), y.dtype))


def _tpu_tiling(block: BlockSizes, m: int, k: int, n: int):
    return (min(block.bm, m), min(block.bk, k), min(block.bn, n))


def gmm_raw(lhs, rhs, group_rows, *, transpose_rhs: bool, block: BlockSizes, platform: str, interpret: bool,
            out_dtype=None):
    out_dtype = jnp.dtype(out_dtype or lhs.dtype)
    R, Kd = lhs.shape
    N = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    if platform == "tpu":
        y = megablox.gmm(lhs, rhs, _tpu_groups(group_rows, R), preferred_element_type=out_dtype,
                         tiling=_tpu_tiling(block, R, Kd, N), transpose_rhs=transpose_rhs,
                         interpret=common.call_kwargs("tpu", interpret).get("interpret", False))
        return _zero_tail(y, group_rows)
    bm = block.bm
    if R % bm:
        raise ValueError(f"rows {R} must be a multiple of the row tile {bm}")
    bk, bn = _gpu_blocks(block, Kd, N, interpret)
    te, nused, _ = tile_metadata(group_rows, R, bm)
    return pl.pallas_call(
        functools.partial(gmm_kernel, bk=bk, kdim=Kd, transpose_rhs=transpose_rhs),
        grid=(R // bm, N // bn),
        in_specs=[pl.BlockSpec(te.shape, lambda i, j: (0,)), pl.BlockSpec((1,), lambda i, j: (0,)),
                  pl.BlockSpec((bm, Kd), lambda i, j: (i, 0)), pl.BlockSpec(rhs.shape, lambda i, j: (0, 0, 0))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((R, N), out_dtype), name="moe_gmm",
        **common.call_kwargs("gpu", interpret, num_warps=block.num_warps, num_stages=block.num_stages),
    )(te, nused, lhs, rhs)


def tgmm_raw(lhs, dy, group_rows, *, block: BlockSizes, platform: str, interpret: bool):
    """[E, Kd, N] float32: per group lhs[rows].T @ dy[rows]."""
    (R, Kd), N, E = lhs.shape, dy.shape[1], group_rows.shape[0]
    if platform == "tpu":
        dy = _zero_tail(dy, group_rows)
        return megablox.tgmm(lhs.swapaxes(0, 1), dy, _tpu_groups(group_rows, R),
                             preferred_element_type=jnp.float32, tiling=_tpu_tiling(block, R, Kd, N),
                             num_actual_groups=E,
                             interpret=common.call_kwargs("tpu", interpret).get("interpret", False))
    bm = block.bm
    bk, bn = _gpu_blocks(block, Kd, N, interpret)
    _, _, ts = tile_metadata(group_rows, R, bm)
    return pl.pallas_call(
        functools.partial(tgmm_kernel, bm=bm), grid=(E, Kd // bk, N // bn),
        in_specs=[pl.BlockSpec(ts.shape, lambda e, a, b: (0,)), pl.BlockSpec((R, Kd), lambda e, a, b: (0, 0)),
                  pl.BlockSpec((R, N), lambda e, a, b: (0, 0))],
        out_specs=pl.BlockSpec((None, bk, bn), lambda e, a, b: (e, a, b)),
        out_shape=jax.ShapeDtypeStruct((E, Kd, N), jnp.float32), name="moe_tgmm",
        **common.call_kwargs("gpu", interpret, num_warps=block.num_warps, num_stages=block.num_stages),
    )(ts, lhs, dy)


@functools.lru_cache(maxsize=None)
def _gmm_fn(transpose_rhs: bool, block: BlockSizes, platform: str, interpret: bool, out_dtype):
    kw = dict(block=block, platform=platform, interpret=interpret)

    @jax.custom_vjp
    def f(lhs, rhs, group_rows):
        return gmm_raw(lhs, rhs, group_rows, transpose_rhs=transpose_rhs, out_dtype=out_dtype, **kw)

    def fwd(lhs, rhs, group_rows):
        return f(lhs, rhs, group_rows), (lhs, rhs, group_rows)

    def bwd(res, dy):
        lhs, rhs, group_rows = res
        dy = dy.astype(lhs.dtype)
        dlhs = gmm_raw(dy, rhs, group_rows, transpose_rhs=not transpose_rhs, **kw)
        drhs = tgmm_raw(dy, lhs, group_rows, **kw) if transpose_rhs else tgmm_raw(lhs, dy, group_rows, **kw)
        return dlhs, drhs.astype(rhs.dtype), None

    f.defvjp(fwd, bwd)
    return f


def gmm(lhs: jax.Array, rhs: jax.Array, group_rows: jax.Array, *, transpose_rhs: bool = False,
        block: BlockSizes | None = None, out_dtype=None, platform: str | None = None,
        interpret: bool | None = None) -> jax.Array:
    """lhs [R, Kd] (rows grouped contiguously, group e owning group_rows[e] rows; trailing rows are
    padding), rhs [E, Kd, N] ([E, N, Kd] with transpose_rhs) -> [R, N] in out_dtype (default lhs.dtype;
    float32 accumulation)."""
    platform, interpret = common.resolve(platform, interpret)
    block = block or BlockSizes.get_default(platform)
    out_dtype = jnp.dtype(out_dtype or lhs.dtype)
    return _gmm_fn(transpose_rhs, block, platform, interpret, out_dtype)(lhs, rhs, group_rows)


def tgmm(lhs: jax.Array, dy: jax.Array, group_rows: jax.Array, *, block: BlockSizes | None = None,
         platform: str | None = None, interpret: bool | None = None) -> jax.Array:
    """Transposed grouped matmul (the weight gradient): [E, Kd, N] float32, out[e] = lhs_e.T @ dy_e."""
    platform, interpret = common.resolve(platform, interpret)
    block = block or BlockSizes.get_default(platform)
    return tgmm_raw(lhs, dy, group_rows, block=block, platform=platform, interpret=interpret)
