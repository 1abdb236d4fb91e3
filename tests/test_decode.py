"""Absorbed-MLA decoding over the latent cache reproduces the full forward, position by position.

A prompt chunk is prefilled in one call, then the remaining tokens are fed one at a time; every step's
logits must equal the full (naive MLA) forward's logits at that position, and transformers' logits,
within max|diff|/max|ref| <= 1e-5. Batch of 2 different rows; total length 40 > the YaRN config's
original_max_position_embeddings (16); the cache has spare slots beyond the sequence (they must be
masked).
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import oracle
import parity_util as pu

TOL = 1e-5
PROMPT = 24
SPARE = 8  # cache slots never written


@pu.jit(static_argnums=0)
def _decode(graphdef, state, toks, pos, cache):
    return nnx.merge(graphdef, state).decode(toks, pos, cache)


@pytest.fixture(scope="module", params=["v3", "v3_yarn"])
def case(request):
    name = request.param
    m = pu.hf_model(name)
    toks = pu.tokens(m.config.vocab_size)
    model = pu.load(pu.saved(name))
    full = pu.forward(model, toks).logits
    return name, model, toks, full, oracle.hf_logits(m, toks)


def _run_decode(model, toks, prompt, max_len):
    B, T = toks.shape
    graphdef, state = nnx.split(model)
    cache = model.init_cache(B, max_len)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    toks = jnp.asarray(toks, jnp.int32)
    out, cache = _decode(graphdef, state, toks[:, :prompt], pos[:, :prompt], cache)
    steps = [np.asarray(out)]
    for t in range(prompt, T):
        out, cache = _decode(graphdef, state, toks[:, t:t + 1], pos[:, t:t + 1], cache)
        steps.append(np.asarray(out))
    return np.concatenate(steps, axis=1), cache


def test_decode_matches_full_forward(case):
    name, model, toks, full, hf = case
    if name == "v3_yarn":
        assert toks.shape[1] > model.cfg.original_max_position_embeddings
    pu.assert_rel(full, hf, TOL, f"{name} full forward vs transformers")
    dec, cache = _run_decode(model, toks, PROMPT, toks.shape[1] + SPARE)
    assert dec.shape == full.shape
    pu.assert_rel(dec[:, :PROMPT], full[:, :PROMPT], TOL, f"{name} prefill chunk")
    for t in range(PROMPT, toks.shape[1]):
        pu.assert_rel(dec[:, t], full[:, t], TOL, f"{name} decode step at position {t}")
    pu.assert_rel(dec, hf, TOL, f"{name} decode vs transformers")
    # cache layout: [L, B, S, .] per stack; spare slots untouched
    cfg = model.cfg
    for c, n in ((cache.dense, cfg.num_dense_layers), (cache.moe, cfg.num_moe_layers)):
        assert c.kv.shape == (n, toks.shape[0], toks.shape[1] + SPARE, cfg.kv_lora_rank)
        assert c.pe.shape == (n, toks.shape[0], toks.shape[1] + SPARE, cfg.qk_rope_head_dim)
        assert not np.asarray(c.kv[:, :, toks.shape[1]:]).any()
        assert np.abs(np.asarray(c.kv[:, :, :toks.shape[1]])).sum(-1).min() > 0


def test_decode_token_by_token_from_start(case):
    # no prefill chunk at all: one token at a time from position 0 (same compiled step as above), most
    # of the cache empty
    name, model, toks, full, _ = case
    dec, _ = _run_decode(model, toks[:, :12], 1, toks.shape[1] + SPARE)
    pu.assert_rel(dec, full[:, :12], TOL, f"{name} token-by-token decode")
