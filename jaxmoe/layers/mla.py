"""Multi-head Latent Attention (dsv3-spec §3): a naive path for training/prefill and an absorbed
path that attends over the latent cache (kv_lora_rank + rope dims per token) for decoding.

Both paths use the same parameters; they differ only in the order of contractions:
naive expands the latent into per-head K/V, absorbed folds W_UK into the query and W_UV into the
output so that the cache never holds per-head tensors.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe import axes
from jaxmoe.config import ModelConfig
from jaxmoe.layers.norm import RMSNorm
from jaxmoe.layers.params import param, weight
from jaxmoe.layers.rope import apply_rope

NEG_INF = -1e30  # finite: a fully masked row (padding) must not produce NaN


class LatentCache(NamedTuple):
    """One layer's absorbed-attention cache. Slot s holds the token at position s."""

    kv: jax.Array  # [B, S_max, C]  RMSNorm_kv(c)
    pe: jax.Array  # [B, S_max, R]  rotated shared rope key


def init_latent_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> LatentCache:
    dt = jnp.dtype(dtype or cfg.dtype)
    return LatentCache(jnp.zeros((batch, max_len, cfg.kv_lora_rank), dt),
                       jnp.zeros((batch, max_len, cfg.qk_rope_head_dim), dt))


def causal_mask(q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
    """[B, 1, T, S] bool: key position <= query position."""
    return (k_pos[:, None, None, :] <= q_pos[:, None, :, None])


class MLA(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        D, N, J = cfg.hidden_size, cfg.num_attention_heads, cfg.qk_head_dim
        C, R, G = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.v_head_dim
        I = cfg.qk_nope_head_dim + G
        if cfg.q_lora_rank is None:
            self.wq_DNJ = param(rngs, (D, N, J), (axes.EMBED, axes.HEADS, axes.HEAD_DIM), cfg)
        else:
            Q = cfg.q_lora_rank
            self.wq_a_DQ = param(rngs, (D, Q), (axes.EMBED, axes.Q_LORA), cfg)
            self.q_norm = RMSNorm(Q, cfg, rngs=rngs)
            self.wq_b_QNJ = param(rngs, (Q, N, J), (axes.Q_LORA, axes.HEADS, axes.HEAD_DIM), cfg)
        self.wkv_a_DP = param(rngs, (D, C + R), (axes.EMBED, axes.KV_LORA), cfg)
        self.kv_norm = RMSNorm(C, cfg, rngs=rngs)
        self.wkv_b_CNI = param(rngs, (C, N, I), (axes.KV_LORA, axes.HEADS, axes.HEAD_DIM), cfg)
        self.wo_NGD = param(rngs, (N, G, D), (axes.HEADS, axes.HEAD_DIM, axes.EMBED), cfg)

    # ------------------------------------------------------------------------------ projections
    def _queries(self, x: jax.Array, cos, sin) -> tuple[jax.Array, jax.Array]:
        cfg = self.cfg
        if cfg.q_lora_rank is None:
            q = jnp.einsum("BTD,DNJ->BTNJ", x, weight(self.wq_DNJ, cfg))
        else:
            q_lat = self.q_norm(jnp.einsum("BTD,DQ->BTQ", x, weight(self.wq_a_DQ, cfg)))
            q = jnp.einsum("BTQ,QNJ->BTNJ", q_lat, weight(self.wq_b_QNJ, cfg))
        q_nope, q_pe = q[..., :cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim:]
        return q_nope, apply_rope(q_pe, cos, sin)

    def _latent(self, x: jax.Array, cos, sin) -> tuple[jax.Array, jax.Array]:
        """(RMSNorm_kv(c) [B, T, C], rotated k_pe [B, T, R])."""
        cfg = self.cfg
        kv = jnp.einsum("BTD,DP->BTP", x, weight(self.wkv_a_DP, cfg))
        c, k_pe = kv[..., :cfg.kv_lora_rank], kv[..., cfg.kv_lora_rank:]
        return self.kv_norm(c), apply_rope(k_pe, cos, sin)

    def _softmax(self, scores: jax.Array, mask: jax.Array, dtype) -> jax.Array:
        scores = scores.astype(jnp.float32) * self.cfg.softmax_scale
        scores = jnp.where(mask, scores, NEG_INF)
        return jax.nn.softmax(scores, axis=-1).astype(dtype)

    # ----------------------------------------------------------------------------------- naive
    def __call__(self, x: jax.Array, positions: jax.Array, cos: jax.Array, sin: jax.Array,
                 mask: jax.Array | None = None) -> jax.Array:
        """Naive MLA over the sequence itself. x [B, T, D], positions [B, T] -> [B, T, D].

        `mask` [B, 1, T, T] overrides the causal mask (e.g. document masking in packed data).
        """
        cfg = self.cfg
        H = cfg.qk_nope_head_dim
        q_nope, q_pe = self._queries(x, cos, sin)
        c, k_pe = self._latent(x, cos, sin)
        kvb = jnp.einsum("BSC,CNI->BSNI", c, weight(self.wkv_b_CNI, cfg))
        k_nope, v = kvb[..., :H], kvb[..., H:]
        scores = (jnp.einsum("BTNH,BSNH->BNTS", q_nope, k_nope, preferred_element_type=jnp.float32)
                  + jnp.einsum("BTNR,BSR->BNTS", q_pe, k_pe, preferred_element_type=jnp.float32))
        if mask is None:
            mask = causal_mask(positions, positions)
        p = self._softmax(scores, mask, x.dtype)
        o = jnp.einsum("BNTS,BSNG->BTNG", p, v)
        return jnp.einsum("BTNG,NGD->BTD", o, weight(self.wo_NGD, cfg))

    # -------------------------------------------------------------------------------- absorbed
    def absorbed(self, x: jax.Array, positions: jax.Array, cos: jax.Array, sin: jax.Array,
                 cache: LatentCache) -> tuple[jax.Array, LatentCache]:
        """Absorbed MLA: write this chunk's latents at `positions`, attend over the cache.

        x [B, T, D], positions [B, T] (slot == position) -> ([B, T, D], updated cache).
        """
        cfg = self.cfg
        H = cfg.qk_nope_head_dim
        q_nope, q_pe = self._queries(x, cos, sin)
        c, k_pe = self._latent(x, cos, sin)
        b = jnp.arange(x.shape[0])[:, None]  # [B, 1] row index for the scatter
        cache = LatentCache(cache.kv.at[b, positions].set(c.astype(cache.kv.dtype)),
                            cache.pe.at[b, positions].set(k_pe.astype(cache.pe.dtype)))
        wkv_b = weight(self.wkv_b_CNI, cfg)
        w_uk, w_uv = wkv_b[..., :H], wkv_b[..., H:]  # [C, N, H], [C, N, G]
        q_abs = jnp.einsum("BTNH,CNH->BTNC", q_nope, w_uk)
        kv, pe = cache.kv.astype(x.dtype), cache.pe.astype(x.dtype)
        scores = (jnp.einsum("BTNC,BSC->BNTS", q_abs, kv, preferred_element_type=jnp.float32)
                  + jnp.einsum("BTNR,BSR->BNTS", q_pe, pe, preferred_element_type=jnp.float32))
        slots = jnp.broadcast_to(jnp.arange(kv.shape[1]), (x.shape[0], kv.shape[1]))
        p = self._softmax(scores, causal_mask(positions, slots), x.dtype)
        u = jnp.einsum("BNTS,BSC->BTNC", p, kv)
        o = jnp.einsum("BTNC,CNG->BTNG", u, w_uv)
        return jnp.einsum("BTNG,NGD->BTD", o, weight(self.wo_NGD, cfg)), cache
