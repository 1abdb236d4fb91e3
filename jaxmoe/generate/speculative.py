"""Greedy speculative decoding with the MTP module as the draft model (dsv3-spec §5).

MTP depth 1 at position i combines the main model's final hidden state h_i with token t_{i+1}
and predicts t_{i+2}. Each step feeds the main model [t_p, d] at positions [p, p+1], where t_p
is the last token known to be greedy and d the MTP draft for position p+1:

  g0 = argmax at p is the greedy token for p+1 (always kept);
  if g0 == d the draft was right, and g1 = argmax at p+1 is the greedy token for p+2 (kept too).

So a step emits 1 or 2 tokens, exactly what plain greedy decoding emits. A rejected draft's
latents sit in cache slot p+1, which the next step (at positions p+1, p+2) rewrites before any
query attends to it (slot == position, causal mask), so nothing is rolled back. The MTP module
keeps its own latent cache: at each step it is fed [h_p, h_{p+1}] with tokens [g0, g1] at
positions [p, p+1], and the next draft comes from the last of those rows that is valid.
Rows advance by different amounts; every row keeps its own positions (as in `engine`).

The accept/reject bookkeeping (tokens per row, EOS, done) runs on device inside a
`lax.while_loop` of up to `SYNC_EVERY` steps (`_verify_block`); the host reads each block's
tokens back once and replays them in order to `on_token`, so it waits on the device once per
block instead of once per step.
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmoe.generate import engine
from jaxmoe.generate.engine import GenerateError, check_prompts, decode_hidden, round_up
from jaxmoe.layers.mla import LatentCache, init_latent_cache
from jaxmoe.layers.params import weight
from jaxmoe.layers.rope import rope_angles

SYNC_EVERY = 8  # verification steps per device round trip (see `_verify_block`)


class SpeculativeGeneration(NamedTuple):
    tokens: list[list[int]]
    prefill_s: float
    decode_s: float
    decode_steps: int       # verification steps (each one main-model call on 2 tokens per row)
    prompt_tokens: int
    cache_bytes: int
    drafts: int             # drafts checked (rows still generating, summed over steps)
    accepted: int

    @property
    def acceptance(self) -> float:
        return self.accepted / max(self.drafts, 1)


def mtp_absorbed(model, hidden: jax.Array, next_tokens: jax.Array, positions: jax.Array,
                 cache: LatentCache) -> tuple[jax.Array, LatentCache]:
    """MTP depth 1 over its latent cache: h [B, T, D] with token i+1 for row i, positions
    [B, T] -> (logits [B, T, V] float32, cache). `MTPModule.__call__` with absorbed attention."""
    m, cfg = model.mtp[0], model.cfg
    emb = weight(m.embed_VD, cfg)[next_tokens]
    u = jnp.concatenate([m.enorm(emb), m.hnorm(hidden)], axis=-1)  # [B, T, 2D]
    x = jnp.einsum("BTU,UD->BTD", u, weight(m.eh_proj_UD, cfg))
    cos, sin = rope_angles(positions, cfg)
    x, cache = m.layer.absorbed(x, positions, cos, sin, cache)
    logits = jnp.einsum("BTD,DV->BTV", m.head_norm(x), weight(m.head_DV, cfg),
                        preferred_element_type=jnp.float32)
    return logits, cache


def _prefill_main(graphdef, state, tokens, start, cache):
    model = nnx.merge(graphdef, state)
    B, C = tokens.shape
    positions = start + jnp.broadcast_to(jnp.arange(C, dtype=jnp.int32), (B, C))
    return decode_hidden(model, tokens, positions, cache)  # (hidden [B, C, D], cache)


def _prefill_mtp(graphdef, state, hidden, next_tokens, start, last_index, draft, cache):
    """One MTP prefill chunk; the draft of each row is read at its last prompt position."""
    model = nnx.merge(graphdef, state)
    B, C = next_tokens.shape
    positions = start + jnp.broadcast_to(jnp.arange(C, dtype=jnp.int32), (B, C))
    logits, cache = mtp_absorbed(model, hidden, next_tokens, positions, cache)
    idx = last_index - start
    inside = (idx >= 0) & (idx < C)
    pick = jnp.take_along_axis(logits, jnp.clip(idx, 0, C - 1)[:, None, None], axis=1)[:, 0]
    return jnp.where(inside, jnp.argmax(pick, -1).astype(jnp.int32), draft), cache


def _first_token(graphdef, state, hidden, last_index):
    """Greedy token after each row's last prompt position: hidden [B, T, D] -> [B]."""
    model = nnx.merge(graphdef, state)
    h = jnp.take_along_axis(hidden, last_index[:, None, None], axis=1)  # [B, 1, D]
    return jnp.argmax(model.logits(h)[:, 0], -1).astype(jnp.int32)


def _verify(graphdef, state, cur, draft, pos, cache, mcache):
    """One speculative step for every row; see the module docstring."""
    model = nnx.merge(graphdef, state)
    toks = jnp.stack([cur, draft], axis=1)               # [B, 2]
    positions = jnp.stack([pos, pos + 1], axis=1)        # [B, 2]
    hidden, cache = decode_hidden(model, toks, positions, cache)
    g = jnp.argmax(model.logits(hidden), -1).astype(jnp.int32)  # [B, 2] greedy for p+1, p+2
    acc = g[:, 0] == draft
    mlog, mcache = mtp_absorbed(model, hidden, g, positions, mcache)
    nxt_draft = jnp.argmax(jnp.where(acc[:, None], mlog[:, 1], mlog[:, 0]), -1).astype(jnp.int32)
    nxt_cur = jnp.where(acc, g[:, 1], g[:, 0])
    return nxt_cur, nxt_draft, pos + 1 + acc.astype(jnp.int32), g, acc, cache, mcache


def _verify_block(graphdef, state, cur, draft, pos, cache, mcache, count, done, eos, max_new, *,
                  n):
    """Up to `n` `_verify` steps on device, stopping once every row is done. The bookkeeping the
    host loop would need per step (tokens emitted per row `count`, EOS, `done`) is carried on
    device, so the host reads back once per block: (state..., g [n, B, 2], acc [n, B], steps
    run). A step emits g0 for a live row, then g1 if the draft was accepted and the row is still
    live; eos < 0 never matches."""
    B = cur.shape[0]

    def step(c):
        i, cur, draft, pos, cache, mcache, count, done, g_log, acc_log = c
        cur, draft, pos, g, acc, cache, mcache = _verify(graphdef, state, cur, draft, pos, cache,
                                                         mcache)
        for j, emits in ((0, ~done), (1, ~done & acc)):  # g1 only after a live row's g0
            count = count + emits.astype(jnp.int32)
            done = done | (emits & ((g[:, j] == eos) | (count >= max_new)))
        return (i + 1, cur, draft, pos, cache, mcache, count, done, g_log.at[i].set(g),
                acc_log.at[i].set(acc))

    init = (jnp.int32(0), cur, draft, pos, cache, mcache, count, done,
            jnp.zeros((n, B, 2), jnp.int32), jnp.zeros((n, B), bool))
    out = jax.lax.while_loop(lambda c: (c[0] < n) & ~c[7].all(), step, init)
    return out[1:] + (out[0],)


_JIT = {}


def _compiled(name):
    if name not in _JIT or _JIT[name][1] != engine._compiler_options:
        fn, kw = {"main": (_prefill_main, dict(static_argnums=0, donate_argnums=(4,))),
                  "first": (_first_token, dict(static_argnums=0)),
                  "mtp": (_prefill_mtp, dict(static_argnums=0, donate_argnums=(6, 7))),
                  "block": (_verify_block, dict(static_argnums=0, static_argnames="n",
                                                donate_argnums=(5, 6)))}[name]
        _JIT[name] = (jax.jit(fn, compiler_options=engine._compiler_options, **kw),
                      engine._compiler_options)
    return _JIT[name][0]


def run_speculative(model, prompt_ids, max_new_tokens: int = 32, *,
                    eos_id: int | None | str = engine.USE_CONFIG,
                    prefill_chunk: int = engine.DEFAULT_PREFILL_CHUNK,
                    on_token: Callable[[int, list], None] | None = None,
                    sync_every: int = SYNC_EVERY) -> SpeculativeGeneration:
    """Greedy generation drafted by the MTP module and verified by the main model: the same
    tokens as `engine.generate(..., temperature=0)`, plus the draft acceptance rate. The host
    reads the device every `sync_every` steps (or when all rows are done), so `on_token` is
    called in bursts of up to that many steps."""
    cfg = model.cfg
    if not len(model.mtp):
        raise GenerateError("speculative decoding needs the MTP module: this model has none "
                            "(num_nextn_predict_layers=0 or no MTP tensors in the checkpoint)")
    prompts = check_prompts(prompt_ids, cfg, max_new_tokens)
    eos = cfg.eos_token_id if eos_id == engine.USE_CONFIG else eos_id
    B = len(prompts)
    lens = np.array([len(p) for p in prompts], np.int32)
    T = int(lens.max())
    if max_new_tokens == 0:
        return SpeculativeGeneration([[] for _ in prompts], 0.0, 0.0, 0, int(lens.sum()), 0, 0, 0)
    chunk = min(prefill_chunk, round_up(T, 16))
    n_chunks = -(-T // chunk)
    S = round_up(T + max_new_tokens + 2, engine.CACHE_ROUND)  # a step may look 2 ahead
    toks = np.zeros((B, n_chunks * chunk), np.int32)
    for i, p in enumerate(prompts):
        toks[i, :len(p)] = p
    graphdef, state = engine.split_committed(model)
    main, mtp, block = _compiled("main"), _compiled("mtp"), _compiled("block")

    t0 = time.perf_counter()
    cache = model.init_cache(B, S)
    hiddens = []
    for c in range(n_chunks):
        h, cache = main(graphdef, state, jnp.asarray(toks[:, c * chunk:(c + 1) * chunk]),
                        jnp.int32(c * chunk), cache)
        hiddens.append(h)
    hidden = jnp.concatenate(hiddens, axis=1)  # [B, T_pad, D]
    cur = _compiled("first")(graphdef, state, hidden, jnp.asarray(lens - 1))  # first new token
    # MTP row i sees (h_i, t_{i+1}); the last prompt row's next token is the first new one
    nxt = np.zeros_like(toks)
    nxt[:, :-1] = toks[:, 1:]
    nxt[np.arange(B), lens - 1] = np.asarray(cur)
    mcache = init_latent_cache(cfg, B, S)
    draft = jnp.zeros((B,), jnp.int32)
    for c in range(n_chunks):
        sl = slice(c * chunk, (c + 1) * chunk)
        draft, mcache = mtp(graphdef, state, hidden[:, sl], jnp.asarray(nxt[:, sl]),
                            jnp.int32(c * chunk), jnp.asarray(lens - 1), draft, mcache)
    del hidden, hiddens
    pos = jnp.asarray(lens)
    first = np.asarray(cur)
    t1 = time.perf_counter()

    out: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(B, bool)

    def emit(step, column):
        new = []
        for r in range(B):
            if done[r] or column[r] is None:
                new.append(None)
                continue
            out[r].append(int(column[r]))
            new.append(int(column[r]))
            if (eos is not None and column[r] == eos) or len(out[r]) >= max_new_tokens:
                done[r] = True
        if on_token is not None and any(t is not None for t in new):
            on_token(step, new)

    emit(0, list(first))
    steps = drafts = accepted = 0
    emitted = 1
    count = jnp.asarray([len(o) for o in out], jnp.int32)
    done_dev, all_done = jnp.asarray(done), done.all()
    eos_dev, max_dev = jnp.int32(-1 if eos is None else eos), jnp.int32(max_new_tokens)
    while not all_done:
        # one read-back per block of up to `sync_every` steps: its tokens, acceptances and the
        # device's `done` (which ends the loop; `emit` applies the same rule on the host)
        cur, draft, pos, cache, mcache, count, done_dev, g_log, acc_log, n_run = block(
            graphdef, state, cur, draft, pos, cache, mcache, count, done_dev, eos_dev, max_dev,
            n=sync_every)
        g_log, acc_log, n_run, all_done = jax.device_get((g_log, acc_log, n_run,
                                                          done_dev.all()))
        for g, acc in zip(g_log[:n_run], acc_log[:n_run]):
            steps += 1
            live = ~done
            drafts += int(live.sum())
            accepted += int((acc & live).sum())
            emit(emitted, list(g[:, 0]))
            emitted += 1
            if acc.any():
                emit(emitted, [g[r, 1] if acc[r] else None for r in range(B)])
                emitted += 1
    jax.block_until_ready(cache)
    t2 = time.perf_counter()
    cache_bytes = sum(a.nbytes for a in jax.tree.leaves((cache, mcache)))
    return SpeculativeGeneration(out, t1 - t0, t2 - t1, steps, int(lens.sum()), cache_bytes,
                                 drafts, accepted)
