"""Dropless expert dispatch in plain jnp: permute (token, expert) pairs by expert, run each
expert's SwiGLU on its contiguous rows, combine back with the routing weights.

Implementations (all exact, all dropless), chosen by `ModelConfig.moe_impl`:
- "segment": rows padded per expert to a multiple of a tile, a loop over tiles multiplies each
  tile by its own expert's weights (custom VJP: the weight gradient accumulates in place). Costs
  the routed FLOPs plus at most one partial tile per expert. The fast path on CPU.
- "ragged_dot": `jax.lax.ragged_dot` on the sorted rows. Native grouped matmul on TPU/GPU, but on
  XLA:CPU it lowers to a dense masked contraction costing E x the routed FLOPs.
- "dense": every expert on every token, masked. E x the FLOPs; a reference for tests.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

IMPLS = ("segment", "ragged_dot", "dense")


def default_impl() -> str:
    return "segment" if jax.default_backend() == "cpu" else "ragged_dot"


class Layout(NamedTuple):
    """Where each (token, k) pair lives in the expert-sorted, tile-padded buffer."""

    dest: jax.Array         # [M*K] padded row of flat pair r = m*K + k
    tile_expert: jax.Array  # [n_tiles] expert of each tile
    n_used: jax.Array       # scalar: tiles that hold rows
    group_sizes: jax.Array  # [E] rows per expert


def tile_layout(experts: jax.Array, num_experts: int, tile: int) -> Layout:
    flat = experts.reshape(-1)  # [M*K]
    n = flat.shape[0]
    order = jnp.argsort(flat, stable=True)  # sorted slot -> flat pair
    sizes = jnp.bincount(flat, length=num_experts)
    padded = (sizes + tile - 1) // tile * tile
    pend = jnp.cumsum(padded)
    pstart, start = pend - padded, jnp.cumsum(sizes) - sizes
    sorted_e = flat[order]
    dest_sorted = pstart[sorted_e] + jnp.arange(n) - start[sorted_e]
    dest = jnp.zeros((n,), jnp.int32).at[order].set(dest_sorted.astype(jnp.int32))
    n_tiles = (n + num_experts * (tile - 1)) // tile  # sum_e ceil(s_e / tile) never exceeds this
    tile_expert = jnp.searchsorted(pend, jnp.arange(n_tiles) * tile, side="right")
    return Layout(dest, jnp.minimum(tile_expert, num_experts - 1).astype(jnp.int32),
                  pend[-1] // tile, sizes)


def _tiles(x, tile):
    return x.reshape(x.shape[0] // tile, tile, x.shape[-1])  # [n_tiles, tile, ·]


def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def segment_swiglu(xp: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array,
                   layout: Layout, tile: int) -> jax.Array:
    """Per tile t of expert e: silu(x_t Wg[e]) * (x_t Wu[e]) Wd[e].

    xp [n_tiles*tile, D] in the padded layout, w_gate/w_up [E, D, F], w_down [E, F, D]
    -> [n_tiles*tile, D]. Tiles past `layout.n_used` hold only padding and are skipped.
    """
    return _swiglu_fwd_loop(xp, w_gate, w_up, w_down, layout, tile)


def _swiglu_fwd_loop(xp, wg, wu, wd, layout, tile):
    D = wd.shape[-1]

    def body(_, inp):
        t, e, xt = inp

        def run():
            h = jax.nn.silu(_dot(xt, wg[e])) * _dot(xt, wu[e])
            return _dot(h.astype(xt.dtype), wd[e]).astype(xt.dtype)

        return None, jax.lax.cond(t < layout.n_used, run, lambda: jnp.zeros((tile, D), xt.dtype))

    n_tiles = layout.tile_expert.shape[0]
    _, y = jax.lax.scan(body, None, (jnp.arange(n_tiles), layout.tile_expert, _tiles(xp, tile)))
    return y.reshape(n_tiles * tile, D)  # [n_tiles*tile, D]


def _swiglu_fwd(xp, wg, wu, wd, layout, tile):
    return _swiglu_fwd_loop(xp, wg, wu, wd, layout, tile), (xp, wg, wu, wd, layout)


def _swiglu_bwd(tile, res, dy):
    """Recomputes the tile's activations; weight gradients accumulate in place per expert."""
    xp, wg, wu, wd, layout = res

    def body(acc, inp):
        t, e, xt, dyt = inp

        def run():
            dwg, dwu, dwd = acc
            g, u = _dot(xt, wg[e]), _dot(xt, wu[e])  # [tile, F] f32
            sg = jax.nn.silu(g)
            h = (sg * u).astype(xt.dtype)
            dh = _dot(dyt, wd[e].T)
            du = dh * sg
            dg = dh * u * jax.nn.sigmoid(g) * (1 + g * (1 - jax.nn.sigmoid(g)))
            dg, du = dg.astype(xt.dtype), du.astype(xt.dtype)
            dxt = _dot(dg, wg[e].T) + _dot(du, wu[e].T)
            upd = lambda a, d: jax.lax.dynamic_update_index_in_dim(a, a[e] + d, e, 0)
            return ((upd(dwg, _dot(xt.T, dg)), upd(dwu, _dot(xt.T, du)),
                     upd(dwd, _dot(h.T, dyt))), dxt.astype(xt.dtype))

        return jax.lax.cond(t < layout.n_used, run, lambda: (acc, jnp.zeros_like(xt)))

    n_tiles = layout.tile_expert.shape[0]
    acc0 = tuple(jnp.zeros(w.shape, jnp.float32) for w in (wg, wu, wd))
    (dwg, dwu, dwd), dx = jax.lax.scan(
        body, acc0, (jnp.arange(n_tiles), layout.tile_expert, _tiles(xp, tile), _tiles(dy, tile)))
    # Integer layout arrays take float0 cotangents.
    d_layout = jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0), layout)
    return (dx.reshape(xp.shape), dwg.astype(wg.dtype), dwu.astype(wu.dtype), dwd.astype(wd.dtype),
            d_layout)


segment_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def _swiglu(gu: jax.Array) -> jax.Array:
    g, u = jnp.split(gu, 2, axis=-1)
    return jax.nn.silu(g) * u


def combine(y_pairs: jax.Array, weights: jax.Array, out_dtype) -> jax.Array:
    """y_pairs [M, K, D] weighted by [M, K] (float32 accumulation) -> [M, D]."""
    return jnp.einsum("MKD,MK->MD", y_pairs.astype(jnp.float32), weights).astype(out_dtype)


def experts_swiglu(x: jax.Array, weights: jax.Array, experts: jax.Array, w_gate: jax.Array,
                   w_up: jax.Array, w_down: jax.Array, impl: str, tile: int = 64) -> jax.Array:
    """Routed experts. x [M, D], weights/experts [M, K], w_gate/w_up [E, D, F], w_down [E, F, D]."""
    M, K = experts.shape
    E = w_gate.shape[0]
    if impl == "dense":
        w_gu = jnp.concatenate([w_gate, w_up], axis=-1)  # [E, D, 2F]
        h = _swiglu(jnp.einsum("MD,EDZ->MEZ", x, w_gu))
        y = jnp.einsum("MEF,EFD->MED", h, w_down)  # [M, E, D]
        return combine(jnp.take_along_axis(y, experts[:, :, None], axis=1), weights, x.dtype)
    if impl == "ragged_dot":
        w_gu = jnp.concatenate([w_gate, w_up], axis=-1)  # [E, D, 2F]
        flat = experts.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        xs = x[order // K]  # [M*K, D] expert-sorted rows
        sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
        h = _swiglu(jax.lax.ragged_dot(xs, w_gu, sizes))
        ys = jax.lax.ragged_dot(h, w_down, sizes)  # [M*K, D]
        y = jnp.zeros_like(ys).at[order].set(ys)  # back to pair order
        return combine(y.reshape(M, K, -1), weights, x.dtype)
    if impl == "segment":
        tile = max(1, min(tile, pl_next_pow2(-(-M * K // E))))
        lay = tile_layout(experts, E, tile)
        n_rows = lay.tile_expert.shape[0] * tile
        src = jnp.arange(M * K) // K  # token of each flat pair
        xp = jnp.zeros((n_rows, x.shape[-1]), x.dtype).at[lay.dest].set(x[src])
        yp = segment_swiglu(xp, w_gate, w_up, w_down, lay, tile)  # [n_rows, D]
        return combine(yp[lay.dest].reshape(M, K, -1), weights, x.dtype)
    raise ValueError(f"unknown moe_impl {impl!r}; expected one of {IMPLS}")


def pl_next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
