"""Choosing the next token from logits: greedy, temperature, nucleus (top-p).

Greedy is `argmax` (the first maximal id on ties, as `torch.argmax` and transformers'
`do_sample=False`). Sampling draws from softmax(logits / temperature) restricted to the
smallest set of most likely tokens whose probability reaches `top_p` (the most likely token is
always kept). All in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmoe.nucleus import nucleus_keep


def top_p_mask(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """[B, V] bool: the tokens kept by nucleus filtering of softmax(logits) at `top_p` (the rule:
    `jaxmoe.nucleus.nucleus_keep`)."""
    return nucleus_keep(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), top_p)


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
