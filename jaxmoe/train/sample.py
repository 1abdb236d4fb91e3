"""A short generated sample after training on a byte-level corpus: prefill the prompt, then
decode one token at a time over the absorbed-MLA latent cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def generate(model, prompt: list[int], n: int, rng, temperature: float = 0.8) -> list[int]:
    graphdef, state = nnx.split(model)
    cache = model.init_cache(1, len(prompt) + n)

    @jax.jit
    def decode(state, tokens, positions, cache):
        return nnx.merge(graphdef, state).decode(tokens, positions, cache)

    @jax.jit
    def pick(logits, key):
        if temperature <= 0:
            return jnp.argmax(logits, -1).astype(jnp.int32)
        return jax.random.categorical(key, logits / temperature).astype(jnp.int32)

    toks = jnp.asarray([prompt], jnp.int32)
    logits, cache = decode(state, toks, jnp.arange(len(prompt))[None], cache)
    out = []
    key = jax.random.fold_in(rng, 12345)
    nxt = pick(logits[:, -1], jax.random.fold_in(key, 0))
    for i in range(n):
        out.append(int(nxt[0]))
        pos = jnp.asarray([[len(prompt) + i]], jnp.int32)
        logits, cache = decode(state, nxt[:, None], pos, cache)
        nxt = pick(logits[:, -1], jax.random.fold_in(key, i + 1))
    return out


def generate_text(model, prompt: bytes, n: int, rng) -> str:
    ids = generate(model, list(prompt), n, rng)
    return (prompt + bytes(i % 256 for i in ids)).decode("utf-8", errors="replace")
