"""The pre-norm decoder layer: h += MLA(norm(h)); h += FFN(norm(h)), FFN dense or MoE."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe.config import ModelConfig
from jaxmoe.layers.mla import MLA, LatentCache
from jaxmoe.layers.mlp import MLP
from jaxmoe.layers.moe import MoE
from jaxmoe.layers.norm import RMSNorm


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
        return h + y, aux

    def __call__(self, h: jax.Array, positions: jax.Array, cos: jax.Array, sin: jax.Array,
                 mask: jax.Array | None = None) -> tuple[jax.Array, dict]:
        h = h + self.attn(self.attn_norm(h), positions, cos, sin, mask)
        return self._ffn(h)

    def absorbed(self, h: jax.Array, positions: jax.Array, cos: jax.Array, sin: jax.Array,
                 cache: LatentCache) -> tuple[jax.Array, LatentCache]:
        a, cache = self.attn.absorbed(self.attn_norm(h), positions, cos, sin, cache)
        h, _ = self._ffn(h + a)
        return h, cache
