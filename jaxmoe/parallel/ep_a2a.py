"""All-to-all expert dispatch inside the EP shard_map: the fixed-buffer and the ragged transports.

Both run per device on its own token rows x [m, D] with their routing (weights/experts [m, K]; expert id
E marks a pair that is not routed: a padding row or a pair dropped by the model's own capacity). Each
(token, expert) pair goes to the device holding the expert (device = expert // experts_per_device), is
computed there by `dispatch.experts_swiglu` with local expert ids (K = 1, unit weight), and comes back;
the sender combines y[m] = sum_k w[m, k] y_pair[m, k] in float32 exactly as the single-device paths do,
so the routing weights never travel and their gradient stays local.

- "a2a_fixed" (`jax.lax.all_to_all`, runs everywhere): one [C, D] buffer per destination device.
  Dropless C = m * min(K, experts_per_device) (every local pair may go to one device: the worst case);
  with a capacity factor C = ceil(factor * m*K / ep) (factor x the mean), and a pair whose rank among
  this device's pairs for its destination (token order, then k) reaches C is dropped and counted.
- "ragged_a2a" (`jax.lax.ragged_all_to_all`, TPU and GPU; XLA:CPU does not implement it): pairs sorted
  by destination travel as one ragged block per peer, so only routed rows cross the wire. The receive
  buffer holds R rows: dropless R = ep * m * min(K, experts_per_device), with a capacity factor
  R = ceil(factor * m*K); when more arrives, each receiver keeps the rows of lower source devices
  first (sender order, then token order) and the senders count the rest as dropped.
  Sizes and offsets are exchanged with `all_to_all` (no all-gather of the traffic matrix).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxmoe.kernels import dispatch


class Local(NamedTuple):
    """What the per-device bodies need to know (static)."""

    axis: str | tuple[str, ...]   # the expert mesh axis (or axes), for the collectives
    ep: int                        # devices along it
    n_local: int                   # experts per device
    impl: str                      # dispatch.experts_swiglu implementation
    tile: int | None
    capacity_factor: float | None


def peer_capacity(m: int, K: int, n_local: int, ep: int, factor: float | None) -> int:
    """Rows of each per-destination buffer of "a2a_fixed" for m local tokens."""
    worst = m * min(K, n_local)
    return worst if factor is None else max(1, min(worst, math.ceil(factor * m * K / ep)))


def recv_capacity(m: int, K: int, n_local: int, ep: int, factor: float | None) -> int:
    """Rows of the receive buffer of "ragged_a2a" (every device sends m*K pairs on average)."""
    worst = ep * m * min(K, n_local)
    return worst if factor is None else max(1, min(worst, math.ceil(factor * m * K)))


def local_experts(rows: jax.Array, ids: jax.Array, wg, wu, wd, ctx: Local) -> jax.Array:
    """rows [R, D] for local experts ids [R] (-1: an empty slot, not computed) -> [R, D], 0 where empty."""
    R = rows.shape[0]
    valid = (ids >= 0)[:, None]  # [R, 1]
    return dispatch.experts_swiglu(rows, jnp.ones((R, 1), jnp.float32), jnp.maximum(ids, 0)[:, None],
                                   wg, wu, wd, impl=ctx.impl, tile=ctx.tile, keep=valid)


def combine(y_rows: jax.Array, pos: jax.Array, w: jax.Array, out_dtype) -> jax.Array:
    """out[m] = sum_k w[m, k] y_rows[pos[m, k]] in float32 (k in order, as `segment`); pos past the end
    of y_rows (a pair that was not computed) reads zero."""
    out = None
    for k in range(pos.shape[1]):
        r = jnp.take(y_rows, pos[:, k], axis=0, mode="fill", fill_value=0).astype(jnp.float32)
        r = r * w[:, k:k + 1].astype(jnp.float32)
        out = r if out is None else out + r
    return out.astype(out_dtype)


def _rank_within(key: jax.Array, n_keys: int) -> jax.Array:
    """[n] -> [n]: how many earlier entries share each entry's key (a stable counting sort's rank)."""
    n = key.shape[0]
    order = jnp.argsort(key, stable=True)
    sizes = jnp.bincount(key, length=n_keys)
    start = jnp.cumsum(sizes) - sizes
    rank_sorted = jnp.arange(n, dtype=jnp.int32) - start[key[order]].astype(jnp.int32)
    return jnp.zeros((n,), jnp.int32).at[order].set(rank_sorted)


def _exclusive_cumsum(a: jax.Array) -> jax.Array:
    return jnp.cumsum(a) - a


def fixed_a2a(x, w, e, wg, wu, wd, ctx: Local) -> tuple[jax.Array, jax.Array]:
    """x [m, D], w/e [m, K] -> (y [m, D], dropped pairs on this device)."""
    m, K = e.shape
    n, ep, El = m * K, ctx.ep, ctx.n_local
    C = peer_capacity(m, K, El, ep, ctx.capacity_factor)
    flat = e.reshape(n)  # [m, K] -> [n]: pair r = token r // K, choice r % K
    dst = jnp.minimum(flat // El, ep)  # [n]; ep: not routed
    rank = _rank_within(dst, ep + 1)
    sent = (dst < ep) & (rank < C)
    slot = jnp.where(sent, dst * C + rank, ep * C)  # [n]; ep*C: past the buffer (reads zero)
    dropped = jnp.sum((dst < ep) & ~sent, dtype=jnp.int32)
    # slot -> pair, so the buffer is built by a gather (its transpose: a segment sum, no scatter of rows)
    pair = jnp.full((ep * C + 1,), n, jnp.int32).at[slot].set(jnp.arange(n, dtype=jnp.int32))[:ep * C]
    filled = pair < n
    rows = jnp.take(x, jnp.where(filled, pair // K, m), axis=0, mode="fill", fill_value=0)  # [ep*C, D]
    ids = jnp.where(filled, flat[jnp.minimum(pair, n - 1)] % El, -1)  # [ep*C] local expert ids
    # tiled all_to_all: block j of C rows goes to device j; what arrives is stacked by source device
    rows = jax.lax.all_to_all(rows, ctx.axis, 0, 0, tiled=True)
    ids = jax.lax.all_to_all(ids, ctx.axis, 0, 0, tiled=True)
    y = local_experts(rows, ids, wg, wu, wd, ctx)  # [ep*C, D]
    y = jax.lax.all_to_all(y, ctx.axis, 0, 0, tiled=True)  # back in this device's slot order
    return combine(y, slot.reshape(m, K), w, x.dtype), dropped  # slot [n] -> [m, K]


# The collective "ragged_a2a" uses; tests may swap in a reference built from all_gather (see simulate).
_RAGGED: list[Callable] = [jax.lax.ragged_all_to_all]


def ragged_collective() -> Callable:
    return _RAGGED[-1]


def simulated() -> bool:
    """True inside `simulate(...)`: the ragged collective is not the native one."""
    return _RAGGED[-1] is not jax.lax.ragged_all_to_all


@contextlib.contextmanager
def simulate(fn: Callable):
    """Trace "ragged_a2a" with `fn` in place of jax.lax.ragged_all_to_all (same signature). For CPU tests
    of the offset/size bookkeeping only; XLA:CPU has no native ragged all-to-all."""
    _RAGGED.append(fn)
    try:
        yield
    finally:
        _RAGGED.pop()


def ragged_a2a(x, w, e, wg, wu, wd, ctx: Local) -> tuple[jax.Array, jax.Array]:
    """x [m, D], w/e [m, K] -> (y [m, D], dropped pairs on this device)."""
    m, K = e.shape
    n, ep, El = m * K, ctx.ep, ctx.n_local
    R = recv_capacity(m, K, El, ep, ctx.capacity_factor)
    a2a = lambda a: jax.lax.all_to_all(a, ctx.axis, 0, 0, tiled=True)  # noqa: E731
    rag = ragged_collective()
    flat = e.reshape(n)  # [m, K] -> [n] pairs
    dst = jnp.minimum(flat // El, ep)  # [n]; ep: not routed (sorts last, never sent)
    order = jnp.argsort(dst, stable=True).astype(jnp.int32)  # sorted row -> pair
    dst_sorted = dst[order]
    send_sizes = jnp.bincount(dst, length=ep + 1)[:ep].astype(jnp.int32)  # [ep] rows for each peer
    in_off = _exclusive_cumsum(send_sizes)
    recv_sizes = a2a(send_sizes)  # [ep] rows offered by each source
    recv_off = _exclusive_cumsum(recv_sizes)  # where each source's block starts here
    accept = jnp.clip(R - recv_off, 0, recv_sizes)  # capacity: lower sources first
    send_ok = a2a(accept)  # [ep] how many of my rows each peer takes
    out_off = a2a(recv_off)  # where my block lands on each peer
    back_off = a2a(in_off)  # where each source wants its results back
    routed = dst_sorted < ep
    rows = jnp.take(x, jnp.where(routed, order // K, m), axis=0, mode="fill", fill_value=0)  # [n, D]
    ids = jnp.where(routed, flat[order] % El, -1)  # [n]
    recv = rag(rows, jnp.zeros((R,) + rows.shape[1:], rows.dtype), in_off, send_ok, out_off, accept,
               axis_name=ctx.axis)  # [R, D]
    rids = rag(ids, jnp.full((R,), -1, ids.dtype), in_off, send_ok, out_off, accept, axis_name=ctx.axis)
    y = local_experts(recv, rids, wg, wu, wd, ctx)  # [R, D]
    back = rag(y, jnp.zeros((n,) + y.shape[1:], y.dtype), recv_off, accept, back_off, send_ok,
               axis_name=ctx.axis)  # [n, D] in sorted-row order
    d = jnp.minimum(dst_sorted, ep - 1)
    ok = routed & (jnp.arange(n, dtype=jnp.int32) - in_off[d] < send_ok[d])
    dropped = jnp.sum(routed & ~ok, dtype=jnp.int32)
    pos = jnp.zeros((n,), jnp.int32).at[order].set(jnp.where(ok, jnp.arange(n, dtype=jnp.int32), n))
    return combine(back, pos.reshape(m, K), w, x.dtype), dropped  # pos [n] -> [m, K]
