"""jaxmoe.generate: greedy continuations equal transformers' `generate(do_sample=False)` token for
token, for a batch of prompts of different lengths (each compared with transformers run on that
prompt alone, unpadded), on V3-, V2- and YaRN-style tiny models, with a chunked prefill (chunk 8:
several chunks and a partial one) and a prompt longer than the YaRN original length. The logits
every new token came from equal transformers' full forward over the same tokens (no cache) at
that position. The decode step compiles once per shape; sampling follows its definition; bad
input gives clear errors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import GenerationConfig

import oracle
import parity_util as pu
from jaxmoe.generate import engine
from jaxmoe.generate.engine import GenerateError, generate, run
from jaxmoe.generate.sampling import pick, top_p_mask

TOL = 1e-5
NEW = 8
CHUNK = 8
LENS = (5, 11, 20)       # v3_yarn: 20 + 8 > original_max_position_embeddings = 16
YARN_LENS = (7, 30, 13)  # a 30-token prompt (> 16) in the middle of the batch

engine.set_compiler_options(pu.FAST_COMPILE)


def prompts_of(lens, vocab, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lens]


@torch.no_grad()
def hf_greedy(m, prompt, n, eos=None):
    cfg = GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=eos, pad_token_id=0)
    ids = torch.tensor([prompt])  # an explicit mask: generate() would take id 0 for padding
    out = m.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module", params=["v3", "v2", "v3_yarn"])
def case(request):
    name = request.param
    m = pu.hf_model(name)
    model = pu.load(pu.saved(name))
    prompts = prompts_of(YARN_LENS if name == "v3_yarn" else LENS, m.config.vocab_size)
    g = run(model, prompts, NEW, prefill_chunk=CHUNK, eos_id=None, keep_logits=True)
    return name, m, model, prompts, g


def test_greedy_batch_equals_transformers(case):
    name, m, model, prompts, g = case
    assert len({len(p) for p in prompts}) == len(prompts)
    if name == "v3_yarn":
        assert max(map(len, prompts)) > model.cfg.original_max_position_embeddings
    for i, (p, ours) in enumerate(zip(prompts, g.tokens)):
        ref = hf_greedy(m, p, NEW)
        assert ours == ref, f"{name} prompt {i} (length {len(p)}): {ours} != transformers {ref}"


def test_cached_logits_equal_full_forward(case):
    # the logits of new token k of row r come from the latent cache; transformers' full forward
    # over prompt + new[:k] (no cache, no padding) gives them at position len + k - 1
    name, m, model, prompts, g = case
    assert g.logits.shape == (len(prompts), NEW, model.cfg.vocab_size)
    for r, (p, new) in enumerate(zip(prompts, g.tokens)):
        full = oracle.hf_logits(m, [p + new[:-1]])[0]  # [len + NEW - 1, V]
        pu.assert_rel(g.logits[r], full[len(p) - 1:], TOL, f"{name} row {r} decode vs full")


def test_eos_stops_each_prompt_like_transformers():
    m, model = pu.hf_model("v3"), pu.load(pu.saved("v3"))
    prompts = prompts_of(LENS, m.config.vocab_size)
    free = run(model, prompts, NEW, prefill_chunk=CHUNK, eos_id=None).tokens
    eos = free[1][2]  # row 1 stops at its third token (or earlier); the others if they meet it
    got = generate(model, prompts, NEW, prefill_chunk=CHUNK, eos_id=eos)
    assert got[1] == free[1][:free[1].index(eos) + 1]
    for i, p in enumerate(prompts):
        assert got[i] == hf_greedy(m, p, NEW, eos=eos), f"prompt {i}"


def test_decode_compiles_once_per_shape():
    model = pu.load(pu.saved("v3"))
    prompts = prompts_of(LENS, model.cfg.vocab_size)
    prefill, decode = engine.compiled("prefill"), engine.compiled("decode")
    run(model, prompts, NEW, prefill_chunk=CHUNK, eos_id=None)  # warm (cached if seen)
    n_pre, n_dec = prefill._cache_size(), decode._cache_size()
    g = run(model, prompts_of(LENS, 97, seed=5), 20, prefill_chunk=CHUNK, eos_id=None)
    assert g.decode_steps == 19
    assert (prefill._cache_size(), decode._cache_size()) == (n_pre, n_dec), \
        "same batch, chunk and cache length: nothing may compile (20 tokens, 3 chunks)"
    a = run(model, prompts, 6, prefill_chunk=CHUNK, temperature=0.7, top_p=0.9, seed=3)
    n_dec = decode._cache_size()
    b = run(model, prompts, 6, prefill_chunk=CHUNK, temperature=1.3, top_p=0.5, seed=3)
    assert decode._cache_size() == n_dec, "temperature / top-p are traced, not compiled in"
    c = run(model, prompts, 6, prefill_chunk=CHUNK, temperature=0.7, top_p=0.9, seed=3)
    assert a.tokens == c.tokens and a.tokens != b.tokens


# ----------------------------------------------------------------------------------- sampling
def test_top_p_mask_is_the_smallest_nucleus():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 50)).astype(np.float32) * 3
    mask = pu.jit(top_p_mask)
    for top_p in (0.05, 0.5, 0.9, 1.0):
        got = np.asarray(mask(logits, np.float32(top_p)))
        for r in range(4):
            p = np.exp(logits[r] - logits[r].max())
            p /= p.sum()
            order = np.argsort(-p, kind="stable")
            k = int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1  # smallest set >= top_p
            want = np.zeros(50, bool)
            want[order[:min(k, 50)]] = True
            np.testing.assert_array_equal(got[r], want, err_msg=f"top_p={top_p} row {r}")


def test_sampling_follows_the_tempered_distribution():
    import jax

    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    n = 20000
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    draw = pu.jit(jax.vmap(lambda k, t, q: pick(logits, k, t, q, greedy=False, nucleus=True)[0],
                           in_axes=(0, None, None)))
    for temp, top_p, want in ((1.0, 1.0, [0.5, 0.3, 0.15, 0.05]),
                              (0.5, 1.0, np.array([25, 9, 2.25, 0.25]) / 36.5),
                              (1.0, 0.7, [0.5 / 0.8, 0.3 / 0.8, 0, 0])):
        freq = np.bincount(np.asarray(draw(keys, np.float32(temp), np.float32(top_p))),
                           minlength=4) / n
        np.testing.assert_allclose(freq, want, atol=0.015, err_msg=f"T={temp} top_p={top_p}")
    assert int(pick(logits, keys[0], 1.0, 1.0, greedy=True, nucleus=False)[0]) == 0


# ------------------------------------------------------------------------------------- errors
def test_bad_input_is_refused_clearly():
    model = pu.load(pu.saved("v3"))
    cfg = model.cfg  # vocab 97, max_position_embeddings 64
    cases = [
        ([list(range(65))], 1, "prompt 0 has 65 tokens, longer than the model's "
                               "max_position_embeddings=64"),
        ([[1, 2], list(range(60))], 8, "prompt 1 has 60 tokens; with max_new_tokens=8 it needs 68"),
        ([[1, 97]], 4, "token id 97 outside the model's vocabulary [0, 97)"),
        ([[1], []], 4, "prompt 1 is empty"),
        ([1, 2, 3], 4, "flat list of ints"),
        ([], 4, "non-empty list"),
        ([[1]], -1, "max_new_tokens=-1"),
    ]
    for prompts, n, msg in cases:
        with pytest.raises(GenerateError) as e:
            generate(model, prompts, n)
        assert msg in str(e.value), (msg, str(e.value))
    for kw, msg in (({"temperature": -1.0}, "temperature=-1.0"), ({"top_p": 0.0}, "top_p=0.0")):
        with pytest.raises(GenerateError) as e:
            generate(model, [[1, 2]], 2, **kw)
        assert msg in str(e.value)
    assert generate(model, [[1, 2]], 0) == [[]]
    assert cfg.max_position_embeddings == 64
