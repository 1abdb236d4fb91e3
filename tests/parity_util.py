"""Shared helpers for the jaxmoe-vs-transformers parity tests.

One place for: the oracle models (built once per process and cached), their save_pretrained folders,
loading them into jaxmoe, a jitted forward keyed on the model graphdef (so every test file that runs the
same config and token shape reuses one compilation), and the relative-error check
max|ours - ref| / max|ref| used by every parity test.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import jaxmoe
import oracle

SEED = 0
INIT_STD = 0.08  # at 0.02 attention is nearly uniform and rope/YaRN mistakes hide
B, T = 2, 40     # T > 16 = original_max_position_embeddings of the small-L0 YaRN configs

# The oracle's tiny torch ops are 10-25x slower with 2 intra-op threads on a shared 2-core machine
# (threads spin while the other core is busy); one thread changes no result that matters here.
torch.set_num_threads(1)

# XLA:CPU backend (LLVM) optimisation level 0 for every test compilation: it halves compile time, which
# dominates these tiny tests, and changes no HLO semantics (same ops, same float32 arithmetic).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def jit(fn=None, **kw):
    """jax.jit with FAST_COMPILE; usable as @jit or @jit(static_argnums=...)."""
    if fn is None:
        return functools.partial(jit, **kw)
    return jax.jit(fn, compiler_options=FAST_COMPILE, **kw)


_TMP = Path(tempfile.mkdtemp(prefix="jaxmoe-parity-"))
atexit.register(shutil.rmtree, _TMP, True)


def parity_configs() -> list[str]:
    return [n for n in oracle.CONFIGS if not n.startswith("bench")]


def tokens(vocab: int, b: int = B, t: int = T, seed: int = 0) -> np.ndarray:
    """[b, t] int32 tokens, every row different."""
    toks = np.random.default_rng(seed).integers(0, vocab, (b, t)).astype(np.int32)
    for i in range(1, b):
        assert not np.array_equal(toks[i], toks[0])
    return toks


@functools.lru_cache(maxsize=None)
def hf_model(name: str, seed: int = SEED, init_std: float = INIT_STD):
    return oracle.build_hf(name, seed=seed, init_std=init_std)


@functools.lru_cache(maxsize=None)
def saved(name: str, sharded: bool = False) -> Path:
    """save_pretrained folder of hf_model(name); sharded=True writes several shards + index.json."""
    path = _TMP / (name + ("-sharded" if sharded else ""))
    oracle.save_hf(hf_model(name), path, max_shard_size="20KB" if sharded else None)
    return path


def fresh_dir(tag: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=tag + "-", dir=_TMP))


def load(path, **kw) -> jaxmoe.DeepseekV3:
    kw.setdefault("mtp", False)
    return jaxmoe.load_model(path, **kw)


@jit(static_argnums=(0, 3))
def _forward(graphdef, state, toks, with_mtp):
    return nnx.merge(graphdef, state).forward(toks, with_mtp=with_mtp)


def forward(model, toks, with_mtp: bool = False):
    """model.forward(toks, with_mtp=...) jitted (one compilation per graphdef, token shape and with_mtp),
    every leaf as numpy: ForwardOut(logits [B, T, V], hidden [B, T, D], aux, mtp_logits, mtp_aux)."""
    graphdef, state = nnx.split(model)
    out = _forward(graphdef, state, jnp.asarray(toks, jnp.int32), with_mtp)
    return jax.tree.map(np.asarray, out)


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert np.isfinite(ours).all(), "non-finite values"
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def assert_rel(ours, ref, tol: float, what: str = "") -> None:
    err = rel_err(ours, ref)
    assert err <= tol, f"{what}: max|diff|/max|ref| = {err:.3e} > {tol:.0e}"


def layer(model, i: int):
    """Decoder layer i (checkpoint numbering) as a standalone module, sliced out of its stack."""
    k = model.cfg.num_dense_layers
    stack, j = (model.dense_layers, i) if i < k else (model.moe_layers, i - k)
    graphdef, state = nnx.split(stack)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[j], state))
