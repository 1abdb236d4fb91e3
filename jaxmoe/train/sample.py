"""A short generated sample after training on a byte-level corpus, through `jaxmoe.generate`
(prefill, then decoding over the absorbed-MLA latent cache)."""

from __future__ import annotations

import jax


def generate(model, prompt: list[int], n: int, rng, temperature: float = 0.8) -> list[int]:
    from jaxmoe.generate.engine import generate as _generate

    seed = int(jax.random.randint(jax.random.fold_in(rng, 12345), (), 0, 2**31 - 1))
    n = min(n, model.cfg.max_position_embeddings - len(prompt))
    return _generate(model, [prompt], n, temperature=temperature, seed=seed, eos_id=None)[0]


def generate_text(model, prompt: bytes, n: int, rng) -> str:
    ids = generate(model, list(prompt), n, rng)
    return (prompt + bytes(i % 256 for i in ids)).decode("utf-8", errors="replace")
