"""Losses in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean token cross-entropy of logits [..., V] against int targets [...] (f32)."""
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    gold = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = logz - gold
    if mask is None:
        return nll.mean()
    mask = mask.astype(jnp.float32)
    return (nll * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def next_token_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Mean CE of logits[:, :-1] predicting tokens[:, 1:]."""
    return cross_entropy(logits[:, :-1], tokens[:, 1:])
