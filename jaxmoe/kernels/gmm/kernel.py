"""Pallas-Triton grouped matmul bodies (GPU); the TPU lowering is jax's megablox (see ops.py).

Layout: the rows are expert-sorted and every expert's rows are padded to a multiple of the row tile
`bm` (`permute.make_plan(align=bm)`), so each row tile belongs to exactly one expert: `tile_expert[i]`.
No tile straddles two experts, so no output tile is visited twice and no row masking is needed; the
cost is at most bm - 1 padding rows per expert (zero rows: they produce zero outputs and add nothing to
the weight gradients).

- `gmm_kernel`: grid (row tiles, N / bn); tile i multiplies by its expert's weights, looping over the
  contraction in bk chunks with a float32 accumulator. Tiles past `n_used` (padding) are written zero.
- `tgmm_kernel` (weight gradient): grid (E, Kd / bk, N / bn); program (e, a, b) sums lhs_tile.T @ dy_tile
  over expert e's row tiles (a dynamic-trip loop), so empty experts get an exact zero.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def _dot(a, b, contract_a: int = 1, contract_b: int = 0):
    """float32-accumulated 2-D dot (lax.dot_general: lowers in Triton and in interpret mode)."""
    return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                               preferred_element_type=jnp.float32)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Row tile bm, contraction chunk bk, output column tile bn (powers of two on GPU); Triton warps/stages."""

    bm: int = 64
    bk: int = 64
    bn: int = 128
    num_warps: int = 4
    num_stages: int = 3

    @classmethod
    def get_default(cls, platform: str = "gpu") -> "BlockSizes":
        return cls(128, 512, 512) if platform == "tpu" else cls(64, 64, 128)


def gmm_kernel(te_ref, nused_ref, lhs_ref, rhs_ref, o_ref, *, bk: int, kdim: int, transpose_rhs: bool):
    i, j = pl.program_id(0), pl.program_id(1)
    bm, bn = o_ref.shape

    @pl.when(i < nused_ref[0])
    def _():
        e = te_ref[i]

        def body(kk, acc):
            a = lhs_ref[:, pl.ds(kk * bk, bk)]  # [bm, bk]
            if transpose_rhs:  # rhs [E, N, Kd]: out = lhs @ rhs[e].T
                b = rhs_ref[e, pl.ds(j * bn, bn), pl.ds(kk * bk, bk)]  # [bn, bk]
                return acc + _dot(a, b, 1, 1)
            b = rhs_ref[e, pl.ds(kk * bk, bk), pl.ds(j * bn, bn)]  # [bk, bn]
            return acc + _dot(a, b)

        acc = jax.lax.fori_loop(0, kdim // bk, body, jnp.zeros((bm, bn), jnp.float32))
        o_ref[...] = acc.astype(o_ref.dtype)

    @pl.when(i >= nused_ref[0])
    def _():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)


def tgmm_kernel(ts_ref, lhs_ref, dy_ref, o_ref, *, bm: int):
    e, a, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bk, bn = o_ref.shape

    def body(t, acc):
        rows = pl.ds(t * bm, bm)
        x = lhs_ref[rows, pl.ds(a * bk, bk)]  # [bm, bk]
        g = dy_ref[rows, pl.ds(b * bn, bn)]   # [bm, bn]
        return acc + _dot(x, g, 0, 0)

    acc = jax.lax.fori_loop(ts_ref[e], ts_ref[e + 1], body, jnp.zeros((bk, bn), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)
