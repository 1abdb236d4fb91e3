"""Choosing the next token from logits: greedy, temperature, nucleus (top-p).

Greedy is `argmax` (the first maximal id on ties, as `torch.argmax` and transformers'
`do_sample=False`). Sampling draws from softmax(logits / temperature) restricted to the
smallest set of most likely tokens whose probability reaches `top_p` (the most likely token is
always kept). All in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def top_p_mask(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """[B, V] bool: the tokens kept by nucleus filtering of softmax(logits) at `top_p`.

    A token is kept when the probability of the tokens strictly more likely than it (ties
    broken by id) is below top_p, so the kept set is the smallest whose mass reaches top_p.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    order = jnp.argsort(-probs, axis=-1, stable=True)           # [B, V] most likely first
    sorted_p = jnp.take_along_axis(probs, order, axis=-1)
    before = jnp.cumsum(sorted_p, axis=-1) - sorted_p            # mass strictly ahead
    keep_sorted = before < top_p
    keep_sorted = keep_sorted.at[:, 0].set(True)
    return jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(
        keep_sorted)


def pick(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array, *,
         greedy: bool, nucleus: bool) -> jax.Array:
    """logits [B, V] -> token ids [B] int32. `greedy` and `nucleus` are static (they choose the
    compiled program); temperature and top_p are traced, so changing them recompiles nothing."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits.astype(jnp.float32) / temperature
    if nucleus:
        scaled = jnp.where(top_p_mask(scaled, top_p), scaled, -jnp.inf)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
