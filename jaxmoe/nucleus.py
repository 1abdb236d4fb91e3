"""Nucleus (top-p) selection: the one statement of the rule, used by token sampling
(`generate/sampling.py`) and by dynamic top-p expert routing (`kernels/router/reference.py`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def nucleus_keep(probs: jax.Array, top_p, min_keep: int = 1) -> jax.Array:
    """probs [R, N] -> [R, N] bool: per row the smallest set of entries, largest first (ties
    broken by index), whose mass reaches top_p, and at least the `min_keep` largest.

    An entry is kept when the mass of the entries ahead of it is below top_p, so the entry that
    crosses top_p is kept too. Rows need not sum to 1; top_p may be traced. Not differentiable
    (a selection): callers pass stop-gradient values or use the mask only to select."""
    R, N = probs.shape
    order = jnp.argsort(-probs, axis=-1, stable=True)           # [R, N] largest first
    mass = jnp.cumsum(jnp.take_along_axis(probs, order, axis=-1), axis=-1)
    before = jnp.pad(mass[:, :-1], ((0, 0), (1, 0)))             # [R, N] mass strictly ahead
    keep_sorted = (before < top_p) | (jnp.arange(N) < min_keep)
    return jnp.zeros((R, N), bool).at[jnp.arange(R)[:, None], order].set(keep_sorted)
