"""Rotary embedding with YaRN, in the interleaved (complex-pair) layout of the DeepSeek weights.

Pair i of a rope vector is (x[2i], x[2i+1]), rotated by angle position * inv_freq[i]
(dsv3-spec §3.4). transformers permutes the rope dims before rotating; q.k is the same either way.
YaRN follows the config when it says so (transformers semantics: on whenever rope type is yarn,
the official code's `max_seq_len > original_seq_len` switch is not applied).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.config import ModelConfig, yarn_mscale


def inv_freq(cfg: ModelConfig) -> np.ndarray:
    """[R/2] float32 inverse frequencies (YaRN-blended when rope_type == 'yarn')."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    # float32 throughout, in the same order of operations as the reference implementations, so
    # angles at long positions agree to the last bits.
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    extrapolation = np.float32(1.0) / pos_freqs
    if cfg.rope_type != "yarn":
        return extrapolation.astype(np.float32)
    interpolation = np.float32(1.0) / (np.float32(cfg.rope_factor) * pos_freqs)

    def corr_dim(rot: float) -> float:
        return dim * math.log(cfg.original_max_position_embeddings / (rot * 2 * math.pi)) / (
            2 * math.log(base))

    low, high = corr_dim(cfg.beta_fast), corr_dim(cfg.beta_slow)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    keep = (1 - ramp).astype(np.float32)
    return (interpolation * (1 - keep) + extrapolation * keep).astype(np.float32)


def attention_factor(cfg: ModelConfig) -> float:
    """Amplitude of cos/sin: mscale(s, mscale) / mscale(s, mscale_all_dim) under YaRN.

    It is exactly 1.0 for every released DeepSeek config; the official code has no such term.
    """
    if cfg.rope_type != "yarn":
        return 1.0
    if cfg.mscale and cfg.mscale_all_dim:
        return yarn_mscale(cfg.rope_factor, cfg.mscale) / yarn_mscale(cfg.rope_factor, cfg.mscale_all_dim)
    return yarn_mscale(cfg.rope_factor)


def rope_angles(positions: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [B, T, R/2] (float32) for integer positions [B, T]."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq(cfg))
    f = attention_factor(cfg)
    return jnp.cos(freqs) * f, jnp.sin(freqs) * f


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs of x [B, T, ..., R] by angles [B, T, R/2]."""
    extra = x.ndim - cos.ndim  # head axes between T and R
    cos = cos.reshape(cos.shape[:2] + (1,) * extra + cos.shape[2:])  # [B, T, (1,)*, R/2]
    sin = sin.reshape(cos.shape)  # the same [B, T, (1,)*, R/2]
    pairs = x.reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))  # [..., R/2, 2]: (real, imag)
    re, im = pairs[..., 0].astype(jnp.float32), pairs[..., 1].astype(jnp.float32)
    out = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)  # [..., R] interleaved again
