"""The CPU grouped path ("segment"): the expert SwiGLU as a loop of one GEMM triple per expert, in XLA.

XLA:CPU has no grouped matmul (`ragged_dot` becomes a dense masked contraction, E x the FLOPs), and
Pallas only interprets there, so the grouped work is a `fori_loop` over (expert, row-chunk) items. What
makes it fast (bench/bench_moe.py measures each point):

- One GEMM call per expert where possible. A CPU GEMM pays a fixed cost per call (packing the expert's
  weights), so rows are not cut into small fixed tiles: an expert's rows are split into chunks of `cap`
  rows plus one remainder chunk rounded up to the next "bucket" size (multiples of 8 up to 64, of 16 up to
  128, of 32 up to 256, of 64 up to 512). Each bucket size is its own loop (static shapes); loops run
  for a data-dependent trip count, so no iteration is wasted. Padding is < one bucket step per expert,
  typically ~4-10% extra rows.
- No padded copy of the activations: the rows are sorted once (argsort of the expert ids) and each
  chunk gathers its token rows straight from x; chunk outputs are written into an expert-sorted buffer
  (rows past a chunk's valid count are masked, so chunks may overlap the next expert's rows).
- The combine and all its transposes are K row gathers (no scatter): out[t] = sum_k w[t,k] y[pos[t,k]].
- A custom VJP: the forward keeps the gate/up products (no recomputation) but not the expert outputs;
  the backward loop writes d x rows into a sorted buffer and accumulates each expert's weight gradients
  in place (transposes materialised so XLA:CPU uses its fast small-GEMM kernel); d weights per pair =
  <d out W_down^T, h>, a by-product of the d h GEMM.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxmoe.kernels.common import next_pow2


def buckets(cap: int) -> tuple[int, ...]:
    """Chunk sizes up to cap: multiples of 8 to 64, of 16 to 128, of 32 to 256, ... then cap itself."""
    step = min(8, cap)
    out, s = [], step
    while s < cap:
        out.append(s)
        if s >= 8 * step:
            step *= 2
        s += step
    return tuple(out) + (cap,)


def default_cap(num_pairs: int, num_experts: int) -> int:
    """Largest chunk: twice the mean rows per expert (power of two), in [8, 512]."""
    return max(8, min(512, next_pow2(2 * -(-num_pairs // num_experts))))


class Items(NamedTuple):
    expert: jax.Array  # [n] expert of each chunk
    start: jax.Array   # [n] first sorted row
    valid: jax.Array   # [n] rows of the chunk that belong to the expert
    count: jax.Array   # scalar: chunks in use


class Plan(NamedTuple):
    pos: jax.Array      # [M, K] sorted row of each pair (dropped pairs: a row nobody writes, zero)
    row_tok: jax.Array  # [n + cap] token of each sorted row (0 past the end)
    row_pair: jax.Array  # [n + cap] pair of each sorted row (-1 past the kept rows)
    items: tuple        # one Items per bucket size


def make_plan(experts: jax.Array, num_experts: int, sizes: tuple[int, ...],
              keep: jax.Array | None = None) -> Plan:
    """Sort the pairs by expert (stable: token order inside an expert) and cut each expert's rows into
    chunks: floor(rows / cap) of `cap` rows, then the remainder in the smallest bucket that holds it."""
    M, K = experts.shape
    n, E, cap = M * K, num_experts, sizes[-1]
    flat = experts.reshape(-1).astype(jnp.int32)  # [M, K] -> [M*K]
    if keep is not None:
        flat = jnp.where(keep.reshape(-1), flat, E)  # keep [M, K] -> [M*K]; dropped pairs sort last, in no group
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)  # sorted row -> pair
    gs = jnp.bincount(flat, length=E).astype(jnp.int32)
    start = jnp.cumsum(gs) - gs
    kept = gs.sum()
    rows = jnp.arange(n, dtype=jnp.int32)
    sorted_pos = jnp.where(rows < kept, rows, n)  # dropped pairs read row n: never written, zero
    pos = jnp.zeros((n,), jnp.int32).at[order].set(sorted_pos).reshape(M, K)  # [M*K] -> [M, K]
    pad = jnp.zeros((cap,), jnp.int32)
    row_tok = jnp.concatenate([order // K, pad])
    row_pair = jnp.concatenate([jnp.where(rows < kept, order, -1), pad - 1])
    full, rem = gs // cap, gs % cap
    bucket = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), rem, side="left")
    items = []
    for li, s in enumerate(sizes):
        c = ((rem > 0) & (bucket == li)).astype(jnp.int32) + (full if s == cap else 0)
        cum = jnp.cumsum(c)
        nmax = min(n, n // s + E) if s == cap else min(n, E)
        i = jnp.arange(nmax, dtype=jnp.int32)
        e = jnp.minimum(jnp.searchsorted(cum, i, side="right"), E - 1).astype(jnp.int32)
        j = i - (cum - c)[e]  # chunk index within the expert (0 for the remainder buckets)
        a = start[e] + (j if s == cap else full[e]) * cap
        items.append(Items(e, a, jnp.minimum(s, start[e] + gs[e] - a), cum[-1]))
    return Plan(pos, row_tok, row_pair, tuple(items))


def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _chunk_loop(sizes, items, body, carry):
    for s, it in zip(sizes, items):
        def step(i, c, s=s, it=it):
            return body(s, it.expert[i], it.start[i], it.valid[i], c)
        carry = jax.lax.fori_loop(0, it.count, step, carry)
    return carry


def _masked_write(buf, rows, start, valid):
    s = rows.shape[0]
    old = jax.lax.dynamic_slice_in_dim(buf, start, s)
    keep = (jnp.arange(s) < valid)[:, None]
    return jax.lax.dynamic_update_slice_in_dim(buf, jnp.where(keep, rows.astype(buf.dtype), old), start, 0)


def _gather_k(buf, pos, w=None):
    """sum_k (w[:, k] *) buf[pos[:, k]] in float32 -> [M, D]."""
    out = None
    for k in range(pos.shape[1]):
        r = jnp.take(buf, pos[:, k], axis=0, mode="clip").astype(jnp.float32)
        r = r if w is None else r * w[:, k:k + 1]
        out = r if out is None else out + r
    return out


def _tdot(a, b):
    """a.T @ b with a materialised transpose: XLA:CPU's fast small-GEMM path (YNNPACK) only takes the
    plain (contract lhs dim 1) form; a transposed-lhs dot falls back to a slower kernel."""
    return _dot(jax.lax.optimization_barrier(a.T), b)


def _forward(x, wg, wu, wd, plan, sizes, save: bool = False):
    """-> y rows [n + cap, D] (sorted order); with save also the gate/up products [n + cap, F] float32."""
    n_rows, F = plan.row_tok.shape[0], wg.shape[-1]

    def body(s, e, a, v, c):
        xt = jnp.take(x, jax.lax.dynamic_slice_in_dim(plan.row_tok, a, s), axis=0, mode="clip")
        g, u = _dot(xt, wg[e]), _dot(xt, wu[e])
        y = _masked_write(c[0], _dot((jax.nn.silu(g) * u).astype(x.dtype), wd[e]), a, v)
        return (y, _masked_write(c[1], g, a, v), _masked_write(c[2], u, a, v)) if save else (y,)

    c0 = (jnp.zeros((n_rows, x.shape[-1]), x.dtype),)
    if save:  # the backward reads them instead of recomputing two GEMMs per chunk
        c0 += (jnp.zeros((n_rows, F), jnp.float32), jnp.zeros((n_rows, F), jnp.float32))
    out = _chunk_loop(sizes, plan.items, body, c0)
    return out if save else out[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _experts(x, w, wg, wu, wd, plan, sizes):
    yp = _forward(x, wg, wu, wd, plan, sizes)
    return _gather_k(yp, plan.pos, w.astype(jnp.float32)).astype(x.dtype)


def _experts_fwd(x, w, wg, wu, wd, plan, sizes):
    yp, gp, up = _forward(x, wg, wu, wd, plan, sizes, save=True)
    out = _gather_k(yp, plan.pos, w.astype(jnp.float32)).astype(x.dtype)
    # yp is not kept: d w = <d out, y> = <d out W_down^T, h> comes from the backward's own GEMM,
    # and under a layer scan every residual is stacked over layers (an [L, rows, D] buffer).
    return out, (x, w, wg, wu, wd, plan, gp, up)


def _experts_bwd(sizes, res, dout):
    x, w, wg, wu, wd, plan, gp, up = res
    dt = x.dtype
    wflat = w.astype(jnp.float32).reshape(-1)  # [M, K] -> [M*K]
    row_w = jnp.where(plan.row_pair >= 0, wflat[jnp.maximum(plan.row_pair, 0)], 0.0)

    def body(s, e, a, v, carry):
        dxp, dwp, dwg, dwu, dwd = carry
        idx = jax.lax.dynamic_slice_in_dim(plan.row_tok, a, s)
        rw = jnp.where(jnp.arange(s) < v, jax.lax.dynamic_slice_in_dim(row_w, a, s), 0.0)
        xt = jnp.take(x, idx, axis=0, mode="clip")
        do = jnp.take(dout, idx, axis=0, mode="clip")  # [s, D] unweighted d out of the chunk's tokens
        g, u = (jax.lax.dynamic_slice_in_dim(b, a, s) for b in (gp, up))  # [s, F] float32
        sg = jax.nn.sigmoid(g)
        h32 = g * sg * u
        q = _dot(do, wd[e].T)  # [s, F] = d out W_down^T; d h = w q and d w = <q, h>
        dwp = _masked_write(dwp, (q * h32).sum(-1, keepdims=True), a, v)
        dh = q * rw[:, None]
        du = (dh * g * sg).astype(dt)
        dg = (dh * u * sg * (1 + g * (1 - sg))).astype(dt)
        dxp = _masked_write(dxp, _dot(dg, wg[e].T) + _dot(du, wu[e].T), a, v)
        dy = (do.astype(jnp.float32) * rw[:, None]).astype(dt)
        add = lambda acc, d: jax.lax.dynamic_update_index_in_dim(acc, acc[e] + d, e, 0)  # noqa: E731
        return (dxp, dwp, add(dwg, _tdot(xt, dg)), add(dwu, _tdot(xt, du)),
                add(dwd, _tdot(h32.astype(dt), dy)))

    zeros = lambda a: jnp.zeros(a.shape, jnp.float32)  # noqa: E731
    n_rows = plan.row_tok.shape[0]
    carry = (jnp.zeros((n_rows, x.shape[-1]), dt), jnp.zeros((n_rows, 1), jnp.float32),
             zeros(wg), zeros(wu), zeros(wd))
    dxp, dwp, dwg, dwu, dwd = _chunk_loop(sizes, plan.items, body, carry)
    dx = _gather_k(dxp, plan.pos).astype(dt)
    dw = jnp.take(dwp[:, 0], plan.pos, mode="clip")  # [M, K]; dropped pairs read the never-written row: 0
    return dx, dw.astype(w.dtype), dwg.astype(wg.dtype), dwu.astype(wu.dtype), dwd.astype(wd.dtype), None


_experts.defvjp(_experts_fwd, _experts_bwd)


def experts_swiglu(x: jax.Array, weights: jax.Array, experts: jax.Array, w_gate: jax.Array,
                   w_up: jax.Array, w_down: jax.Array, *, cap: int | None = None,
                   keep: jax.Array | None = None) -> jax.Array:
    """Routed experts on the CPU. x [M, D], weights/experts [M, K], w_gate/w_up [E, D, F],
    w_down [E, F, D] -> [M, D]; pairs with keep == False are dropped. cap: largest chunk (rows)."""
    M, K = experts.shape
    E = w_gate.shape[0]
    sizes = buckets(cap or default_cap(M * K, E))
    plan = make_plan(experts, E, sizes, keep)
    w = weights if keep is None else jnp.where(keep, weights, 0)
    return _experts(x, w, w_gate, w_up, w_down, plan, sizes)


def executed_rows(experts: jax.Array, num_experts: int, cap: int | None = None) -> jax.Array:
    """Rows the loop multiplies (valid + bucket padding), for FLOP accounting: scalar."""
    M, K = experts.shape
    sizes = buckets(cap or default_cap(M * K, num_experts))
    plan = make_plan(experts, num_experts, sizes)
    return sum(it.count * s for s, it in zip(sizes, plan.items))
