"""RMSNorm, always computed in float32 (dtype policy)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe import axes
from jaxmoe.config import ModelConfig
from jaxmoe.layers.params import param


class RMSNorm(nnx.Module):
    """y = scale * x / sqrt(mean(x^2) + eps); the reduction and scaling run in f32."""

    def __init__(self, dim: int, cfg: ModelConfig, *, rngs: nnx.Rngs | None = None):
        self.eps = cfg.rms_norm_eps
        self.scale = param(rngs, (dim,), (axes.NORM,), cfg, init="ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        # Cast to the input dtype before scaling, as transformers does: identical in f32, and in
        # bf16 it keeps the checkpoint's published behaviour.
        return self.scale[...].astype(x.dtype) * y.astype(x.dtype)
