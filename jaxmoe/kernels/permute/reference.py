"""Plain-jnp references of the permute kernels (row gather, weighted combine, its weight gradient)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gather_rows(x: jax.Array, idx: jax.Array, scale: jax.Array | None = None) -> jax.Array:
    """out[r] = x[idx[r]] * scale[r]; rows with idx < 0 are zero. x [N, D], idx [R] -> [R, D]."""
    s = jnp.ones(idx.shape, jnp.float32) if scale is None else scale.astype(jnp.float32)
    s = jnp.where(idx >= 0, s, 0.0)
    return (x[jnp.maximum(idx, 0)].astype(jnp.float32) * s[:, None]).astype(x.dtype)


def combine(y: jax.Array, pos: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
    """out[t] = sum_k w[t, k] * y[pos[t, k]] in float32. y [R, D], pos/w [T, K] -> [T, D]."""
    g = y[pos].astype(jnp.float32)  # [T, K, D]
    return jnp.einsum("MKD,MK->MD", g, w.astype(jnp.float32)).astype(out_dtype or y.dtype)


def combine_dw(dout: jax.Array, y: jax.Array, pos: jax.Array) -> jax.Array:
    """dw[t, k] = <dout[t], y[pos[t, k]]> in float32 -> [T, K]."""
    return jnp.einsum("MD,MKD->MK", dout.astype(jnp.float32), y[pos].astype(jnp.float32))
