"""Multi-Token Prediction module (dsv3-spec §5), depth k predicting token t+k+1.

h'_i = eh_proj([enorm(emb(t_{i+k})); hnorm(h_i)]) - embedding half FIRST, the order of the
released weights - then one full decoder layer with its own causal attention over the shortened
sequence, then head(shared_head_norm(.)). h is the previous depth's output; for depth 1 the main
model's final hidden state after the final norm (what vLLM/SGLang feed the released module).
The embedding and head are separate parameters, as stored in the checkpoint (layer 61); the spec
shares them with the main model (§5.2), so training ties them (`train.step.tie_mtp_embeddings`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe import axes
from jaxmoe.config import ModelConfig
from jaxmoe.layers.block import DecoderLayer
from jaxmoe.layers.norm import RMSNorm
from jaxmoe.layers.params import param, weight
from jaxmoe.layers.rope import rope_angles


class MTPModule(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int, *, rngs: nnx.Rngs):
        self.cfg = cfg
        D, V = cfg.hidden_size, cfg.vocab_size
        self.embed_VD = param(rngs, (V, D), (axes.VOCAB, axes.EMBED), cfg)
        self.enorm = RMSNorm(D, cfg, rngs=rngs)
        self.hnorm = RMSNorm(D, cfg, rngs=rngs)
        # U = the 2D-wide concatenation [embedding; hidden].
        self.eh_proj_UD = param(rngs, (2 * D, D), (None, axes.EMBED), cfg)
        self.layer = DecoderLayer(cfg, cfg.is_moe_layer(layer_index), rngs=rngs)
        self.head_norm = RMSNorm(D, cfg, rngs=rngs)
        self.head_DV = param(rngs, (D, V), (axes.EMBED, axes.VOCAB), cfg)

    def __call__(self, h: jax.Array, next_tokens: jax.Array, positions: jax.Array,
                 mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array, dict]:
        """h [B, T', D] aligned with next_tokens [B, T'] (token i+k for row i), positions [B, T'];
        `mask` [B, 1, T', T'] overrides the causal mask (document masking in packed rows).

        Returns (logits [B, T', V] float32, this depth's hidden [B, T', D], routing aux).
        """
        cfg = self.cfg
        emb = weight(self.embed_VD, cfg)[next_tokens]
        u = jnp.concatenate([self.enorm(emb), self.hnorm(h)], axis=-1)  # [B, T', 2D]
        x = jnp.einsum("BTU,UD->BTD", u, weight(self.eh_proj_UD, cfg))
        cos, sin = rope_angles(positions, cfg)
        x, aux = self.layer(x, positions, cos, sin, mask)
        logits = jnp.einsum("BTD,DV->BTV", self.head_norm(x), weight(self.head_DV, cfg),
                            preferred_element_type=jnp.float32)
        return logits, x, aux
