"""Prefill and decode over the absorbed-MLA latent cache (dsv3-spec §3.5).

Batching prompts of different lengths: rows are right-padded to the longest prompt and every
row keeps its own positions (slot == position in the cache). Row i's prompt fills slots
0..len_i-1; its pad tokens write slots from len_i on, but a query at position p attends only
slots <= p and row i's decode step at position p rewrites slot p before attending, so no pad
slot is ever seen. Each row's first new token comes from the logits at its own last prompt
position, then all rows decode in lockstep at their own positions (len_i + step).

Chunked prefill: the padded prompt goes through the absorbed path `prefill_chunk` tokens at a
time; a chunk's attention scores are [B, N, chunk, S], so memory grows linearly with the cache
length S instead of with T^2. The LM head runs on one position per row (the last prompt token).

Compilation: one program per (model, batch, chunk, cache length) for the prefill chunk and one
for the decode step (the cache has a fixed size; positions, the step's random key, temperature
and top-p are traced), so decoding never recompiles per token. Cache lengths are rounded up to
a multiple of `CACHE_ROUND` so prompts of similar lengths share programs.
"""

from __future__ import annotations

import math
import time
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmoe.generate.sampling import pick
from jaxmoe.layers.params import weight
from jaxmoe.layers.rope import rope_angles
from jaxmoe.layers.stack import run_stack_absorbed
from jaxmoe.model import DecodeCache, DeepseekV3

CACHE_ROUND = 64
DEFAULT_PREFILL_CHUNK = 256
USE_CONFIG = "config"  # eos_id default: the model config's eos_token_id


class GenerateError(ValueError):
    """Bad generation input (prompt, lengths, sampling settings); the message names it."""


class Generation(NamedTuple):
    tokens: list[list[int]]     # new tokens per prompt (up to and including EOS)
    logits: np.ndarray | None   # [B, steps, V] float32, the logits each new token came from
    prefill_s: float            # wall seconds of the prefill (incl. the first token's pick)
    decode_s: float             # wall seconds of the decode steps
    decode_steps: int           # decode steps run (each one token per row)
    prompt_tokens: int          # real (unpadded) prompt tokens of all rows
    cache_bytes: int            # bytes of the latent cache as allocated [B, S]


# ------------------------------------------------------------------------------ model math
def decode_hidden(model: DeepseekV3, tokens: jax.Array, positions: jax.Array,
                  cache: DecodeCache) -> tuple[jax.Array, DecodeCache]:
    """`DeepseekV3.decode` up to the final norm: tokens/positions [B, T] -> (hidden [B, T, D],
    updated cache). The caller applies the LM head only where it needs logits."""
    cfg = model.cfg
    cos, sin = rope_angles(positions, cfg)
    h = weight(model.embed_VD, cfg)[tokens]  # [B, T, D]
    dense, moe = cache
    if model.dense_layers is not None:
        h, dense = run_stack_absorbed(model.dense_layers, h, positions, cos, sin, dense)
    if model.moe_layers is not None:
        h, moe = run_stack_absorbed(model.moe_layers, h, positions, cos, sin, moe)
    return model.final_norm(h), DecodeCache(dense, moe)


def cache_bytes_per_token(cfg, dtype=None) -> int:
    """Latent cache per token of a ModelConfig: (kv_lora_rank + qk_rope_head_dim) values per
    layer, in `dtype` (default the compute dtype, the cache's)."""
    itemsize = jnp.dtype(dtype or cfg.dtype).itemsize
    return cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * itemsize


# ------------------------------------------------------------------------- compiled steps
def _prefill_chunk(graphdef, state, tokens, start, last_index, last_logits, cache):
    """One prefill chunk at positions start..start+C-1 for every row; the logits of each row's
    last prompt position are taken when it lies in this chunk (else `last_logits` is kept)."""
    model = nnx.merge(graphdef, state)
    B, C = tokens.shape
    positions = start + jnp.broadcast_to(jnp.arange(C, dtype=jnp.int32), (B, C))
    hidden, cache = decode_hidden(model, tokens, positions, cache)
    idx = last_index - start  # [B] offset of the last prompt token inside this chunk
    inside = (idx >= 0) & (idx < C)
    h = jnp.take_along_axis(hidden, jnp.clip(idx, 0, C - 1)[:, None, None], axis=1)  # [B, 1, D]
    logits = model.logits(h)[:, 0]  # [B, V]
    return jnp.where(inside[:, None], logits, last_logits), cache


def _pick(logits, key, step, temperature, top_p, *, greedy, nucleus):
    return pick(logits, jax.random.fold_in(key, step), temperature, top_p,
                greedy=greedy, nucleus=nucleus)


def _decode_step(graphdef, state, tokens, positions, cache, key, step, temperature, top_p, *,
                 greedy, nucleus):
    """tokens/positions [B] -> (next tokens [B], their logits [B, V], positions + 1, cache)."""
    model = nnx.merge(graphdef, state)
    hidden, cache = decode_hidden(model, tokens[:, None], positions[:, None], cache)
    logits = model.logits(hidden)[:, 0]
    nxt = pick(logits, jax.random.fold_in(key, step), temperature, top_p,
               greedy=greedy, nucleus=nucleus)
    return nxt, logits, positions + 1, cache


_JIT_ARGS = {
    "prefill": (_prefill_chunk, dict(static_argnums=0, donate_argnums=(5, 6))),
    "pick": (_pick, dict(static_argnames=("greedy", "nucleus"))),
    "decode": (_decode_step, dict(static_argnums=0, static_argnames=("greedy", "nucleus"),
                                  donate_argnums=(4,))),
}
_jitted: dict = {}
_compiler_options: dict | None = None


def set_compiler_options(options: dict | None) -> None:
    """XLA compiler options for the generation programs (e.g. the tests' fast-compile level);
    drops the programs compiled so far."""
    global _compiler_options
    options = dict(options) if options else None
    if options != _compiler_options:
        _compiler_options = options
        _jitted.clear()


def compiled(name: str):
    """The jitted step `name` ("prefill", "pick", "decode"), built once per compiler options."""
    if name not in _jitted:
        fn, kw = _JIT_ARGS[name]
        _jitted[name] = jax.jit(fn, compiler_options=_compiler_options, **kw)
    return _jitted[name]


# ------------------------------------------------------------------------------- checking
def check_prompts(prompt_ids, cfg, max_new_tokens: int) -> list[list[int]]:
    """Validate and normalise: a non-empty list of non-empty token-id lists, ids in the
    vocabulary, every prompt + max_new_tokens within max_position_embeddings."""
    if isinstance(prompt_ids, (np.ndarray, jax.Array)):
        prompt_ids = np.asarray(prompt_ids).tolist()
    if not isinstance(prompt_ids, Sequence) or isinstance(prompt_ids, (str, bytes)) or \
            not prompt_ids:
        raise GenerateError("prompt_ids must be a non-empty list of token-id lists, got "
                            f"{type(prompt_ids).__name__}")
    if all(isinstance(t, (int, np.integer)) for t in prompt_ids):
        raise GenerateError("prompt_ids must be a list of token-id lists (one per prompt); got "
                            "a flat list of ints: wrap it as [ids]")
    check_settings(max_new_tokens=max_new_tokens)
    out = []
    V, limit = cfg.vocab_size, cfg.max_position_embeddings
    for i, p in enumerate(prompt_ids):
        try:
            ids = [int(t) for t in (p if isinstance(p, list) else np.asarray(p).reshape(-1))]  # any shape -> [n]
        except (TypeError, ValueError):
            raise GenerateError(f"prompt {i}: not a list of token ids ({p!r:.60})") from None
        if not ids:
            raise GenerateError(f"prompt {i} is empty: every prompt needs at least one token")
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise GenerateError(f"prompt {i}: token id {bad[0]} outside the model's vocabulary "
                                f"[0, {V}) (vocab_size={V}; is the tokenizer the model's?)")
        if len(ids) > limit:
            raise GenerateError(f"prompt {i} has {len(ids)} tokens, longer than the model's "
                                f"max_position_embeddings={limit}")
        if len(ids) + max_new_tokens > limit:
            raise GenerateError(f"prompt {i} has {len(ids)} tokens; with max_new_tokens="
                                f"{max_new_tokens} it needs {len(ids) + max_new_tokens} "
                                f"positions, more than the model's max_position_embeddings="
                                f"{limit} (lower max_new_tokens to {limit - len(ids)})")
        out.append(ids)
    return out


SEED_LIMIT = 2**32  # PRNGKey keeps 32 bits of the seed: seed + 2**32 would repeat seed's stream


def _named(arg: str, value, flags: bool) -> str:
    """A setting as an error names it: `top_p=0.0` (the API) or `--top-p 0.0` (the CLI)."""
    return f"--{arg.replace('_', '-')} {value}" if flags else f"{arg}={value}"


def check_settings(*, max_new_tokens: int = 0, temperature: float = 0.0, top_p: float = 1.0,
                   seed: int = 0, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                   flags: bool = False) -> None:
    """The checks that need no model: `run` applies them, `jaxmoe-generate` too but before it
    loads a checkpoint (flags=True names the command-line flags instead of the arguments)."""
    rules = (
        ("max_new_tokens", max_new_tokens, max_new_tokens >= 0, "must be >= 0"),
        ("temperature", temperature, temperature >= 0 and math.isfinite(temperature),
         "must be >= 0 (0 = greedy)"),
        ("top_p", top_p, 0 < top_p <= 1, "must be in (0, 1]"),
        ("seed", seed, 0 <= seed < SEED_LIMIT, "must be in [0, 2**32) (the random key keeps "
                                                "32 bits of it)"),
        ("prefill_chunk", prefill_chunk, prefill_chunk >= 1, "must be >= 1"),
    )
    for arg, value, ok, rule in rules:
        if not ok:
            raise GenerateError(f"{_named(arg, value, flags)}: {rule}")


def check_eos(eos_id: int | None, vocab_size: int, *, flags: bool = False) -> None:
    """An explicit EOS id must be a token of the vocabulary: one outside it is never generated,
    so it would silently never stop a prompt. None (never stop) passes."""
    if eos_id is not None and not 0 <= eos_id < vocab_size:
        never = "-1" if flags else "None"
        raise GenerateError(f"{_named('eos_id', eos_id, flags)}: outside the model's vocabulary "
                            f"[0, {vocab_size}) (vocab_size={vocab_size}); it could never be "
                            f"generated ({never}: never stop early)")


def split_committed(model) -> tuple:
    """nnx.split, with a single-device model's arrays committed to their device: restored
    (Orbax) arrays are committed and freshly built ones are not, and jit compiles each kind
    separately; this way a model compiles the same programs however it was loaded."""
    graphdef, state = nnx.split(model)
    devices = {d for x in jax.tree.leaves(state) if isinstance(x, jax.Array)
               for d in x.devices()}
    if len(devices) <= 1:  # (numpy leaves go to the default device)
        state = jax.device_put(state, devices.pop() if devices else jax.devices()[0])
    return graphdef, state


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# ------------------------------------------------------------------------------- the loop
def run(model: DeepseekV3, prompt_ids, max_new_tokens: int = 32, *, temperature: float = 0.0,
        top_p: float = 1.0, seed: int = 0, eos_id: int | None | str = USE_CONFIG,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK, cache_len: int | None = None,
        keep_logits: bool = False,
        on_token: Callable[[int, list], None] | None = None) -> Generation:
    """Generate for a batch of prompts; see `generate`. Returns a `Generation` with timings
    (and with keep_logits=True the logits each new token was chosen from)."""
    cfg = model.cfg
    prompts = check_prompts(prompt_ids, cfg, max_new_tokens)
    check_settings(temperature=temperature, top_p=top_p, seed=seed, prefill_chunk=prefill_chunk)
    if isinstance(eos_id, str) and eos_id == USE_CONFIG:
        eos = cfg.eos_token_id
    else:
        check_eos(eos_id, cfg.vocab_size)
        eos = eos_id
    B = len(prompts)
    lens = np.array([len(p) for p in prompts], np.int32)
    T = int(lens.max())
    if max_new_tokens == 0:
        return Generation([[] for _ in prompts], None, 0.0, 0.0, 0, int(lens.sum()), 0)
    chunk = min(prefill_chunk, round_up(T, 16))
    n_chunks = -(-T // chunk)
    S = cache_len or round_up(T + max_new_tokens, CACHE_ROUND)
    if S < T + max_new_tokens:
        raise GenerateError(f"cache_len={cache_len}: shorter than the longest prompt ({T}) + "
                            f"max_new_tokens ({max_new_tokens})")
    toks = np.zeros((B, n_chunks * chunk), np.int32)  # right-padded; pads are token 0
    for i, p in enumerate(prompts):
        toks[i, :len(p)] = p

    graphdef, state = split_committed(model)
    greedy, nucleus = temperature == 0, top_p < 1.0
    key = jax.random.PRNGKey(seed)
    temp = jnp.float32(temperature if temperature > 0 else 1.0)
    tp = jnp.float32(top_p)

    prefill, decode = compiled("prefill"), compiled("decode")
    t0 = time.perf_counter()
    cache = model.init_cache(B, S)
    last = jnp.zeros((B, cfg.vocab_size), jnp.float32)
    last_index = jnp.asarray(lens - 1)
    for c in range(n_chunks):
        part = jnp.asarray(toks[:, c * chunk:(c + 1) * chunk])  # [B, chunk]
        last, cache = prefill(graphdef, state, part, jnp.int32(c * chunk), last_index, last,
                              cache)
    tok = compiled("pick")(last, key, 0, temp, tp, greedy=greedy, nucleus=nucleus)
    first_logits = last
    tok.block_until_ready()
    t1 = time.perf_counter()

    out: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(B, bool)
    logits_steps = [first_logits] if keep_logits else None
    pos = jnp.asarray(lens)
    steps = 0
    for i in range(max_new_tokens):
        more = i + 1 < max_new_tokens
        if more:  # dispatch the next step before reading this token (overlaps the host work)
            nxt, logits, npos, cache = decode(graphdef, state, tok, pos, cache, key, i + 1,
                                              temp, tp, greedy=greedy, nucleus=nucleus)
            steps += 1
        host = np.asarray(tok)
        new = []
        for r in range(B):
            if done[r]:
                new.append(None)
                continue
            out[r].append(int(host[r]))
            new.append(int(host[r]))
            if eos is not None and host[r] == eos:
                done[r] = True
        if on_token is not None:
            on_token(i, new)
        if not more or done.all():
            break
        if keep_logits:
            logits_steps.append(logits)
        tok, pos = nxt, npos
    jax.block_until_ready(cache)
    t2 = time.perf_counter()
    kept = None
    if keep_logits:
        kept = np.stack([np.asarray(x) for x in logits_steps], axis=1)  # [B, steps, V]
    cache_bytes = sum(a.nbytes for a in jax.tree.leaves(cache))
    return Generation(out, kept, t1 - t0, t2 - t1, steps, int(lens.sum()), cache_bytes)


def generate(model: DeepseekV3, prompt_ids, max_new_tokens: int = 32, *,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             eos_id: int | None | str = USE_CONFIG, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
             on_token: Callable[[int, list], None] | None = None) -> list[list[int]]:
    """New token ids for each prompt of `prompt_ids` (a list of token-id lists, lengths may
    differ), at most `max_new_tokens` each, ending at `eos_id` (default: the config's
    eos_token_id; None never stops early) when it is generated.

    temperature 0 is greedy (token for token what transformers' `generate(do_sample=False)`
    gives); otherwise softmax sampling at `temperature`, restricted to the top-p nucleus, from
    `seed`. `on_token(step, tokens)` is called as tokens arrive: one entry per prompt, None for
    a prompt that has already ended.
    """
    return run(model, prompt_ids, max_new_tokens, temperature=temperature, top_p=top_p,
               seed=seed, eos_id=eos_id, prefill_chunk=prefill_chunk, on_token=on_token).tokens
