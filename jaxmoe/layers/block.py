"""The pre-norm decoder layer: h += MLA(norm(h)); h += FFN(norm(h)), FFN dense or MoE.

The residual stream is pinned to (act_batch, act_seq, act_embed) after each sub-layer, so under
a mesh layout (`Layout.scope()`) XLA keeps it laid out by the rules between layers instead of
choosing per layer; without a layout the pins are no-ops.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe import axes
from jaxmoe.config import ModelConfig
from jaxmoe.layers.mla import MLA, LatentCache
from jaxmoe.layers.mlp import MLP
from jaxmoe.layers.moe import MoE
from jaxmoe.layers.norm import RMSNorm
from jaxmoe.parallel.sharding import constrain

RESIDUAL = (axes.ACT_BATCH, axes.ACT_SEQ, axes.ACT_EMBED)


def empty_aux(cfg: ModelConfig) -> dict:
    """The aux of a dense layer, shaped like a MoE layer's so stacks stay homogeneous."""
    return {"counts": jnp.zeros((max(cfg.n_routed_experts, 1),), jnp.float32),
            "seq_balance": jnp.zeros((), jnp.float32), "score_entropy": jnp.zeros((), jnp.float32)}


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, moe: bool, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg, rngs=rngs)
        self.attn = MLA(cfg, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg, rngs=rngs)
        self.ffn = MoE(cfg, rngs=rngs) if moe else MLP(cfg, cfg.intermediate_size, rngs=rngs)

    def _ffn(self, h: jax.Array) -> tuple[jax.Array, dict]:
        y = self.ffn(self.ffn_norm(h))
        if isinstance(y, tuple):
            y, aux = y
        else:
            aux = empty_aux(self.cfg)
        return constrain(h + y, RESIDUAL), aux

    def __call__(self, h: jax.Array, positions: jax.Array, cos: jax.Array, sin: jax.Array,
                 mask: jax.Array | None = None) -> tuple[jax.Array, dict]:
        h = constrain(h + self.attn(self.attn_norm(h), positions, cos, sin, mask), RESIDUAL)
        return self._ffn(h)

    def absorbed(self, h: jax.Array, positions: jax.Array, cos: jax.Array, sin: jax.Array,
                 cache: LatentCache) -> tuple[jax.Array, LatentCache]:
        a, cache = self.attn.absorbed(self.attn_norm(h), positions, cos, sin, cache)
        h, _ = self._ffn(constrain(h + a, RESIDUAL))
        return h, cache
