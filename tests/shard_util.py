"""The tiny model, its loss and a jitted forward+backward, shared by the sharded-model test and
the multi-process children: one definition, so every layout runs the same program."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxmoe

# XLA:CPU LLVM optimisation level 0: halves compile time, same HLO and float32 arithmetic
FAST_COMPILE = {"xla_backend_optimization_level": 0}
B, T = 8, 12


def tiny_cfg():
    """tiny with one dense and one MoE layer plus the MTP module (every parameter kind)."""
    return jaxmoe.tiny(num_hidden_layers=2)


def host_parts(cfg, seed: int = 3):
    """(graphdef, params, rest) from the trainer's numpy init: identical in every process."""
    from jaxmoe.train.state import host_init

    graphdef, params, rest = nnx.split(
        nnx.eval_shape(lambda: jaxmoe.DeepseekV3(cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)
    return graphdef, host_init(params, cfg, seed), host_init(rest, cfg, seed + 1)


def tokens(vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (B, T + 1)).astype(np.int32)


def make_step(graphdef, out_shardings=None):
    """jit(params, rest, tokens [B, T+1]) -> ((loss, logits [B, T, V]), grads): next-token CE
    plus MTP CE and the balance term, so every parameter gets a gradient."""

    def loss_fn(params, rest, tok):
        model = nnx.merge(graphdef, params, rest)
        out = model.forward(tok[:, :-1], with_mtp=True)
        lp = jax.nn.log_softmax(out.logits, -1)
        ce = -jnp.take_along_axis(lp, tok[:, 1:, None], -1).mean()
        mtp = 0.0
        for k, lg in enumerate(out.mtp_logits, start=1):  # [B, T-k, V]: row i -> token i+k+1
            lpk = jax.nn.log_softmax(lg, -1)
            mtp = mtp - jnp.take_along_axis(lpk, tok[:, k + 1:, None], -1).mean()
        bal = out.aux["seq_balance"].sum()
        return ce + 0.3 * mtp + 0.01 * bal, out.logits

    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True), compiler_options=FAST_COMPILE,
                   out_shardings=out_shardings)


def flat(tree) -> dict[str, np.ndarray]:
    from jaxmoe.parallel.sharding import path_str

    return {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}
