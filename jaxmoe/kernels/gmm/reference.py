"""Plain-jnp references of the grouped matmuls (dense masked: E x the FLOPs; for tests only)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def row_groups(group_rows: jax.Array, num_rows: int) -> jax.Array:
    """[R] one-hot float32 [R, E] of the group owning each row (rows past the last group: all zero)."""
    ends = jnp.cumsum(group_rows)
    g = jnp.searchsorted(ends, jnp.arange(num_rows), side="right")
    return jax.nn.one_hot(g, group_rows.shape[0], dtype=jnp.float32)


def gmm(lhs: jax.Array, rhs: jax.Array, group_rows: jax.Array, transpose_rhs: bool = False) -> jax.Array:
    """out[r] = lhs[r] @ rhs[g(r)] (or rhs[g(r)].T): lhs [R, Kd], rhs [E, Kd, N] -> [R, N] in lhs.dtype."""
    oh = row_groups(group_rows, lhs.shape[0])
    spec = "WX,WE,EYX->WY" if transpose_rhs else "WX,WE,EXY->WY"
    out = jnp.einsum(spec, lhs.astype(jnp.float32), oh, rhs.astype(jnp.float32))
    return out.astype(lhs.dtype)


def tgmm(lhs: jax.Array, dy: jax.Array, group_rows: jax.Array) -> jax.Array:
    """out[e] = lhs[rows of e].T @ dy[rows of e]: lhs [R, Kd], dy [R, N] -> [E, Kd, N] float32."""
    oh = row_groups(group_rows, lhs.shape[0])
    return jnp.einsum("WX,WE,WY->EXY", lhs.astype(jnp.float32), oh, dy.astype(jnp.float32))
