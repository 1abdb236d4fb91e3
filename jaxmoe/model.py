"""DeepseekV3: embedding, the dense stack, the MoE stack (each scanned), final norm, LM head,
and the optional MTP modules. Parameter for parameter the PyTorch topology.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe import axes
from jaxmoe.config import ModelConfig
from jaxmoe.layers.mla import LatentCache, init_latent_cache
from jaxmoe.layers.mtp import MTPModule
from jaxmoe.layers.norm import RMSNorm
from jaxmoe.layers.params import param, weight
from jaxmoe.layers.rope import rope_angles
from jaxmoe.layers.stack import make_stack, run_stack, run_stack_absorbed


class ForwardOut(NamedTuple):
    logits: jax.Array        # [B, T, V] float32
    hidden: jax.Array        # [B, T, D] final hidden state after the final norm
    aux: dict                # MoE routing stats stacked over MoE layers: counts [L_moe, E], ...
    mtp_logits: tuple        # per MTP depth k: [B, T-k, V] float32 (empty unless requested)
    mtp_aux: tuple


class DecodeCache(NamedTuple):
    dense: LatentCache | None  # [L_dense, B, S, ·]
    moe: LatentCache | None    # [L_moe, B, S, ·]


class DeepseekV3(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, remat: bool = False):
        self.cfg = cfg
        self.remat = remat
        D, V = cfg.hidden_size, cfg.vocab_size
        self.embed_VD = param(rngs, (V, D), (axes.VOCAB, axes.EMBED), cfg)
        k, L = cfg.num_dense_layers, cfg.num_hidden_layers
        self.dense_layers = make_stack(cfg, k, moe=False, rngs=rngs) if k else None
        self.moe_layers = make_stack(cfg, L - k, moe=True, rngs=rngs) if L - k else None
        self.final_norm = RMSNorm(D, cfg, rngs=rngs)
        self.lm_head_DV = param(rngs, (D, V), (axes.EMBED, axes.VOCAB), cfg)
        self.mtp = nnx.List([MTPModule(cfg, L + i, rngs=rngs)
                             for i in range(cfg.num_nextn_predict_layers)])

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """tokens int32 [B, T] -> logits float32 [B, T, V]."""
        return self.forward(tokens, positions).logits

    def forward(self, tokens: jax.Array, positions: jax.Array | None = None, *,
                mask: jax.Array | None = None, with_mtp: bool = False) -> ForwardOut:
        cfg = self.cfg
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        cos, sin = rope_angles(positions, cfg)
        h = weight(self.embed_VD, cfg)[tokens]  # [B, T, D]
        if self.dense_layers is not None:
            h, _ = run_stack(self.dense_layers, h, positions, cos, sin, mask, self.remat)
        aux = {}
        if self.moe_layers is not None:
            h, aux = run_stack(self.moe_layers, h, positions, cos, sin, mask, self.remat)
        hidden = self.final_norm(h)
        logits = self.logits(hidden)
        mtp_logits, mtp_aux = [], []
        if with_mtp:
            mtp_logits, mtp_aux = self.mtp_forward(hidden, tokens, positions, mask)
        return ForwardOut(logits, hidden, aux, tuple(mtp_logits), tuple(mtp_aux))

    def mtp_forward(self, hidden: jax.Array, tokens: jax.Array, positions: jax.Array,
                    mask: jax.Array | None = None) -> tuple[list, list]:
        """Every MTP depth from the main model's final hidden state [B, T, D].

        Depth k: row i combines h_i with token i+k and predicts token i+k+1; its attention mask is
        the main mask's top-left [T-k, T-k] block. Returns (logits per depth, aux per depth).
        """
        logits, auxes = [], []
        prev, T = hidden, tokens.shape[1]
        for k, module in enumerate(self.mtp, start=1):
            m = None if mask is None else mask[:, :, :T - k, :T - k]
            lg, prev, a = module(prev[:, :-1], tokens[:, k:], positions[:, :-k], m)
            logits.append(lg)
            auxes.append(a)
        return logits, auxes

    def logits(self, hidden: jax.Array) -> jax.Array:
        B, T, D = hidden.shape
        # 2-D matmul for a transpose-free weight gradient (see layers/mlp.py)
        logits = jnp.einsum("MD,DV->MV", hidden.reshape(B * T, D),  # [B, T, D] -> [M, D]
                            weight(self.lm_head_DV, self.cfg),
                            preferred_element_type=jnp.float32)
        return logits.reshape(B, T, -1)  # [B, T, V]

    # ------------------------------------------------------------------- absorbed-cache decode
    def init_cache(self, batch: int, max_len: int, dtype=None) -> DecodeCache:
        cfg = self.cfg

        def stacked(n):
            if not n:
                return None
            c = init_latent_cache(cfg, batch, max_len, dtype)
            return LatentCache(*(jnp.broadcast_to(a, (n,) + a.shape) for a in c))  # [L, B, S, ·]

        return DecodeCache(stacked(cfg.num_dense_layers), stacked(cfg.num_moe_layers))

    def decode(self, tokens: jax.Array, positions: jax.Array, cache: DecodeCache
               ) -> tuple[jax.Array, DecodeCache]:
        """Absorbed MLA over the latent cache: tokens/positions [B, T] (a prefill chunk or one
        step) -> (logits [B, T, V] float32, updated cache)."""
        cos, sin = rope_angles(positions, self.cfg)
        h = weight(self.embed_VD, self.cfg)[tokens]
        dense, moe = cache
        if self.dense_layers is not None:
            h, dense = run_stack_absorbed(self.dense_layers, h, positions, cos, sin, dense)
        if self.moe_layers is not None:
            h, moe = run_stack_absorbed(self.moe_layers, h, positions, cos, sin, moe)
        return self.logits(self.final_norm(h)), DecodeCache(dense, moe)
