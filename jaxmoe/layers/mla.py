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
from jaxmoe.parallel.sharding import constrain

# per-head activations [B, T, N, ·]: heads split over the rules' act_heads axes under a layout
PER_HEAD = (axes.ACT_BATCH, axes.ACT_SEQ, axes.ACT_HEADS, None)

NEG_INF = -1e30  # finite: a fully masked row (padding) must not produce NaN
Q_CHUNK = 128  # naive path: queries per block of the block-causal attention


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
    # Projections are 2-D matmuls over the flattened tokens M = B*T and the flattened head axes:
    # with [B, T, ...] operands XLA:CPU transposes activations before every weight-gradient dot.
    def _queries(self, x: jax.Array, cos, sin) -> tuple[jax.Array, jax.Array]:
        """x [B, T, D] -> (q_nope [B, T, N, H], rotated q_pe [B, T, N, R])."""
        cfg = self.cfg
        B, T, D = x.shape
        N, J = cfg.num_attention_heads, cfg.qk_head_dim
        xm = x.reshape(B * T, D)  # [M, D]
        if cfg.q_lora_rank is None:
            q = jnp.dot(xm, weight(self.wq_DNJ, cfg).reshape(D, N * J))  # [M, N*J]
        else:
            q_lat = self.q_norm(jnp.einsum("MD,DQ->MQ", xm, weight(self.wq_a_DQ, cfg)))
            q = jnp.dot(q_lat, weight(self.wq_b_QNJ, cfg).reshape(-1, N * J))  # [M, N*J]
        q = q.reshape(B, T, N, J)  # [B, T, N, J]
        q_nope, q_pe = q[..., :cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim:]
        return q_nope, apply_rope(q_pe, cos, sin)

    def _latent(self, x: jax.Array, cos, sin) -> tuple[jax.Array, jax.Array]:
        """(RMSNorm_kv(c) [B, T, C], rotated k_pe [B, T, R])."""
        cfg = self.cfg
        B, T, D = x.shape
        kv = jnp.einsum("MD,DP->MP", x.reshape(B * T, D), weight(self.wkv_a_DP, cfg))  # [B, T, D] -> [M, D]
        kv = kv.reshape(B, T, -1)  # [B, T, P]
        c, k_pe = kv[..., :cfg.kv_lora_rank], kv[..., cfg.kv_lora_rank:]
        return self.kv_norm(c), apply_rope(k_pe, cos, sin)

    def _out(self, o: jax.Array) -> jax.Array:
        """Per-head values o [B, T, N, G] -> [B, T, D] through W_O."""
        B, T, N, G = o.shape
        w = weight(self.wo_NGD, self.cfg)
        y = jnp.dot(o.reshape(B * T, N * G), w.reshape(N * G, -1))  # [M, N*G] @ [N*G, D]
        return y.reshape(B, T, -1)  # [B, T, D]

    def _softmax(self, scores: jax.Array, mask: jax.Array, dtype) -> jax.Array:
        scores = scores.astype(jnp.float32) * self.cfg.softmax_scale
        scores = jnp.where(mask, scores, NEG_INF)
        return jax.nn.softmax(scores, axis=-1).astype(dtype)

    # ----------------------------------------------------------------------------------- naive
    def __call__(self, x: jax.Array, positions: jax.Array, cos: jax.Array, sin: jax.Array,
                 mask: jax.Array | None = None) -> jax.Array:
        """Naive MLA over the sequence itself. x [B, T, D], positions [B, T] -> [B, T, D].

        Causal by index (query t sees keys 0..t, as in the published model); `mask` [B, 1, T, T]
        restricts it further (e.g. document masking in packed data).
        """
        cfg = self.cfg
        B, T, _ = x.shape
        N, H, R, C = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
        q_nope, q_pe = self._queries(x, cos, sin)
        c, k_pe = self._latent(x, cos, sin)
        kvb = jnp.dot(c.reshape(B * T, C), weight(self.wkv_b_CNI, cfg).reshape(C, -1))  # [M, N*I]
        kvb = kvb.reshape(B, T, N, -1)  # [B, S, N, I]
        # one score contraction over [nope | rope]: the shared rope key is broadcast over heads
        q = constrain(jnp.concatenate([q_nope, q_pe], -1), PER_HEAD)  # [B, T, N, J]
        k = constrain(jnp.concatenate([kvb[..., :H], jnp.broadcast_to(k_pe[:, :, None],
                                                                      (B, T, N, R))], -1), PER_HEAD)
        v = constrain(kvb[..., H:], PER_HEAD)  # [B, S, N, G]
        outs = []
        for t0 in range(0, T, Q_CHUNK):
            # block-causal: queries [t0, t1) never see keys past t1, so those keys are not computed
            t1 = min(t0 + Q_CHUNK, T)
            scores = jnp.einsum("BTNJ,BSNJ->BNTS", q[:, t0:t1], k[:, :t1],
                                preferred_element_type=jnp.float32)
            allowed = jnp.arange(t0, t1)[:, None] >= jnp.arange(t1)[None, :]  # [T', S']
            if mask is not None:
                allowed = allowed & mask[:, :, t0:t1, :t1]
            p = self._softmax(scores, allowed, x.dtype)
            outs.append(jnp.einsum("BNTS,BSNG->BTNG", p, v[:, :t1]))
        o = jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]  # [B, T, N, G]
        return self._out(constrain(o, PER_HEAD))

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
        return self._out(jnp.einsum("BTNC,CNG->BTNG", u, w_uv)), cache
