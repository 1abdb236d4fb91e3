"""Permute / unpermute of the (token, expert) pairs: the sort plan (jnp), the Pallas launches, and the
differentiable `permute` (tokens -> expert-sorted rows) and `combine` (rows -> tokens, weighted).

    plan = make_plan(experts, E, align=..., row_multiple=...)     # int metadata, no gradient
    xs = permute(x, plan)                # [R, D]: rows of expert 0, then expert 1, ... (+ padding rows)
    out = combine(ys, weights, plan)     # [T, D] = sum_k weights[t, k] * ys[pos[t, k]]

Gradients: d x = combine(d xs, keep) (each token sums its K rows), d ys = gather(d out, row token,
scale = the row's weight), d weights = combine_dw(d out, ys). All three are gathers (no scatter).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxmoe.kernels import common
from jaxmoe.kernels.permute import kernel as kn


class Plan(NamedTuple):
    """Where each (token, k) pair lives in the expert-sorted buffer of R rows.

    Each expert's rows start at a multiple of `align` (1: contiguous; the GPU grouped matmul uses its
    row tile, so every tile holds one expert). Rows not holding a pair are padding (zero in `permute`).
    Pairs dropped by a capacity limit point at row R-1, which is then always padding.
    """

    pos: jax.Array          # [T, K] int32 row of each pair
    keep: jax.Array         # [T, K] float32 1 = routed, 0 = dropped
    row_pair: jax.Array     # [R] int32 flat pair t*K + k of each row, -1 on padding
    group_sizes: jax.Array  # [E] int32 rows holding pairs, per expert
    group_rows: jax.Array   # [E] int32 rows reserved per expert (group_sizes rounded up to align)


def make_plan(experts: jax.Array, num_experts: int, *, align: int = 1, row_multiple: int = 8,
              keep: jax.Array | None = None) -> Plan:
    """experts [T, K] int32 (+ keep [T, K] bool) -> Plan with R = round_up(T*K + E*(align-1), row_multiple)."""
    T, K = experts.shape
    n, E = T * K, num_experts
    R = common.round_up(max(n + E * (align - 1), 1), row_multiple)
    flat = experts.reshape(-1).astype(jnp.int32)  # [T, K] -> [T*K]
    if keep is not None:
        flat = jnp.where(keep.reshape(-1), flat, E)  # keep [T, K] -> [T*K]; dropped pairs sort last, in no group
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)  # sorted slot -> pair
    sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
    rows = (sizes + align - 1) // align * align
    pstart, start = jnp.cumsum(rows) - rows, jnp.cumsum(sizes) - sizes
    se = flat[order]
    sec = jnp.minimum(se, E - 1)
    dest = jnp.where(se < E, pstart[sec] + jnp.arange(n, dtype=jnp.int32) - start[sec], R - 1)
    pos = jnp.zeros((n,), jnp.int32).at[order].set(dest.astype(jnp.int32))
    row_pair = jnp.full((R,), -1, jnp.int32).at[jnp.where(se < E, dest, R)].set(order, mode="drop")
    keepf = (jnp.ones((T, K), jnp.float32) if keep is None else keep.astype(jnp.float32))
    return Plan(pos.reshape(T, K), keepf, row_pair, sizes, rows.astype(jnp.int32))  # pos [T*K] -> [T, K]


def row_token(plan: Plan, k: int) -> jax.Array:
    return jnp.where(plan.row_pair >= 0, plan.row_pair // k, -1)


# ------------------------------------------------------------------------------------- Pallas launches
_ANY = pl.BlockSpec(memory_space=pl.ANY)  # TPU: stays in HBM, the kernel DMAs what it needs

def gather_rows(x, idx, scale=None, *, platform=None, interpret=None, block_rows: int = 64):
    """out[r] = x[idx[r]] * scale[r] (zero where idx < 0): x [N, D], idx [R] -> [R, D]."""
    platform, interpret = common.resolve(platform, interpret)
    R, (N, D) = idx.shape[0], x.shape
    bm = common.pow2_divisor(R, block_rows)
    s = jnp.ones((R,), jnp.float32) if scale is None else scale.astype(jnp.float32)
    kw = common.call_kwargs(platform, interpret, num_warps=4, num_stages=1, semantics=("parallel",))
    out_shape = jax.ShapeDtypeStruct((R, D), x.dtype)
    if platform == "gpu":
        bd = common.pow2_divisor(D, 256)
        return pl.pallas_call(
            functools.partial(kn.gather_kernel, bd=bd), grid=(R // bm, D // bd),
            in_specs=[pl.BlockSpec((bm,), lambda i, j: (i,)), pl.BlockSpec((bm,), lambda i, j: (i,)),
                      pl.BlockSpec((N, D), lambda i, j: (0, 0))],
            out_specs=pl.BlockSpec((bm, bd), lambda i, j: (i, j)), out_shape=out_shape,
            name="moe_gather_rows", **kw)(idx, s, x)
    s = jnp.where(idx >= 0, s, 0.0)[:, None]
    return pl.pallas_call(
        kn.gather_kernel_tpu, grid=(R // bm,),
        in_specs=[_ANY, pl.BlockSpec((bm, 1), lambda i: (i, 0)), _ANY],
        out_specs=pl.BlockSpec((bm, D), lambda i: (i, 0)), out_shape=out_shape,
        scratch_shapes=[pltpu.SMEM((bm,), jnp.int32), pltpu.SemaphoreType.DMA],
        name="moe_gather_rows", **kw)(idx[None], s, x)


def _token_blocks(T: int, platform: str, D: int, K: int, itemsize: int) -> tuple[int, int]:
    """(bt, padded T): GPU bt = 16; TPU bt a multiple of 8 with the [K, bt, D] buffer <= 4 MiB."""
    if platform == "gpu":
        bt = 16
    else:
        bt = max(8, min(64, (4 << 20) // max(K * D * itemsize, 1) // 8 * 8))
    return bt, common.round_up(max(T, 1), bt)


def combine_rows(y, pos, w, out_dtype=None, *, platform=None, interpret=None):
    """out[t] = sum_k w[t, k] * y[pos[t, k]] (float32 accumulation): y [R, D], pos/w [T, K] -> [T, D]."""
    platform, interpret = common.resolve(platform, interpret)
    (R, D), (T, K) = y.shape, pos.shape
    out_dtype = out_dtype or y.dtype
    bt, Tp = _token_blocks(T, platform, D, K, y.dtype.itemsize)
    kw = common.call_kwargs(platform, interpret, num_warps=4, num_stages=1, semantics=("parallel",))
    if platform == "gpu":
        Kp, bd = common.next_pow2(K), common.pow2_divisor(D, 256)
        pos_p = jnp.pad(pos, ((0, Tp - T), (0, Kp - K)))
        w_p = jnp.pad(w.astype(jnp.float32), ((0, Tp - T), (0, Kp - K)))
        out = pl.pallas_call(
            functools.partial(kn.combine_kernel, bd=bd, k=K), grid=(Tp // bt, D // bd),
            in_specs=[pl.BlockSpec((bt, Kp), lambda i, j: (i, 0)), pl.BlockSpec((bt, Kp), lambda i, j: (i, 0)),
                      pl.BlockSpec((R, D), lambda i, j: (0, 0))],
            out_specs=pl.BlockSpec((bt, bd), lambda i, j: (i, j)),
            out_shape=jax.ShapeDtypeStruct((Tp, D), out_dtype), name="moe_combine", **kw)(pos_p, w_p, y)
        return out[:T]
    pos_p = jnp.pad(pos, ((0, Tp - T), (0, 0))).reshape(1, -1)  # [1, Tp*K]: 2-D for Mosaic
    w_p = jnp.pad(w.astype(jnp.float32), ((0, Tp - T), (0, 0)))
    out = pl.pallas_call(
        functools.partial(kn.combine_kernel_tpu, k=K), grid=(Tp // bt,),
        in_specs=[_ANY, pl.BlockSpec((bt, K), lambda i: (i, 0)), _ANY],
        out_specs=pl.BlockSpec((bt, D), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((Tp, D), out_dtype),
        scratch_shapes=[pltpu.SMEM((bt * K,), jnp.int32), pltpu.VMEM((K, bt, D), y.dtype),
                        pltpu.SemaphoreType.DMA],
        name="moe_combine", **kw)(pos_p, w_p, y)
    return out[:T]


def combine_dw(dout, y, pos, *, platform=None, interpret=None):
    """dw[t, k] = <dout[t], y[pos[t, k]]> in float32: dout [T, D], y [R, D], pos [T, K] -> [T, K]."""
    platform, interpret = common.resolve(platform, interpret)
    (R, D), (T, K) = y.shape, pos.shape
    bt, Tp = _token_blocks(T, platform, D, K, y.dtype.itemsize)
    kw = common.call_kwargs(platform, interpret, num_warps=4, num_stages=1, semantics=("parallel",))
    dout_p = jnp.pad(dout, ((0, Tp - T), (0, 0)))
    if platform == "gpu":
        Kp, bd = common.next_pow2(K), common.pow2_divisor(D, 256)
        pos_p = jnp.pad(pos, ((0, Tp - T), (0, Kp - K)))
        dw = pl.pallas_call(
            functools.partial(kn.combine_dw_kernel, bd=bd, k=K, d=D), grid=(Tp // bt,),
            in_specs=[pl.BlockSpec((bt, Kp), lambda i: (i, 0)), pl.BlockSpec((bt, D), lambda i: (i, 0)),
                      pl.BlockSpec((R, D), lambda i: (0, 0))],
            out_specs=pl.BlockSpec((bt, Kp), lambda i: (i, 0)),
            out_shape=jax.ShapeDtypeStruct((Tp, Kp), jnp.float32), name="moe_combine_dw", **kw)(pos_p, dout_p, y)
        return dw[:T, :K]
    pos_p = jnp.pad(pos, ((0, Tp - T), (0, 0))).reshape(1, -1)  # [1, Tp*K]: 2-D for Mosaic
    dw = pl.pallas_call(
        functools.partial(kn.combine_dw_kernel_tpu, k=K), grid=(Tp // bt,),
        in_specs=[_ANY, pl.BlockSpec((bt, D), lambda i: (i, 0)), _ANY],
        out_specs=pl.BlockSpec((bt, K), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((Tp, K), jnp.float32),
        scratch_shapes=[pltpu.SMEM((bt * K,), jnp.int32), pltpu.VMEM((K, bt, D), y.dtype),
                        pltpu.SemaphoreType.DMA],
        name="moe_combine_dw", **kw)(pos_p, dout_p, y)
    return dw[:T]


# --------------------------------------------------------------------------------- differentiable ops
@functools.lru_cache(maxsize=None)
def _ops(platform: str, interpret: bool):
    kw = dict(platform=platform, interpret=interpret)

    @jax.custom_vjp
    def permute(x, plan):
        return gather_rows(x, row_token(plan, plan.pos.shape[1]), **kw)

    def permute_fwd(x, plan):
        return permute(x, plan), plan

    def permute_bwd(plan, dxs):
        return combine_rows(dxs, plan.pos, plan.keep, **kw), None

    permute.defvjp(permute_fwd, permute_bwd)

    @jax.custom_vjp
    def combine(ys, w, plan):
        return combine_rows(ys, plan.pos, w * plan.keep, **kw)

    def combine_fwd(ys, w, plan):
        return combine(ys, w, plan), (ys, w, plan)

    def combine_bwd(res, dout):
        ys, w, plan = res
        K = plan.pos.shape[1]
        wk = (w * plan.keep).reshape(-1)  # [T, K] -> [T*K], indexed by row_pair
        row_w = jnp.where(plan.row_pair >= 0, wk[jnp.maximum(plan.row_pair, 0)], 0.0)
        dys = gather_rows(dout.astype(ys.dtype), row_token(plan, K), row_w, **kw)
        dw = combine_dw(dout, ys, plan.pos, **kw) * plan.keep
        return dys, dw.astype(w.dtype), None

    combine.defvjp(combine_fwd, combine_bwd)
    return permute, combine


def permute(x: jax.Array, plan: Plan, *, platform=None, interpret=None) -> jax.Array:
    """x [T, D] -> expert-sorted rows [R, D] (padding rows zero). Differentiable in x."""
    return _ops(*common.resolve(platform, interpret))[0](x, plan)


def combine(ys: jax.Array, w: jax.Array, plan: Plan, *, platform=None, interpret=None) -> jax.Array:
    """Sorted rows ys [R, D] and weights w [T, K] -> [T, D] in ys.dtype (float32 accumulation).
    Differentiable in ys and w; dropped pairs (plan.keep == 0) contribute nothing."""
    return _ops(*common.resolve(platform, interpret))[1](ys, w, plan)
