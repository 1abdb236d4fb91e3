"""SwiGLU MLP: the dense FFN of the first layers and the fused shared-expert block."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe import axes
from jaxmoe.config import ModelConfig
from jaxmoe.layers.params import param, weight


class MLP(nnx.Module):
    """y = W_down (silu(W_gate x) * W_up x)."""

    def __init__(self, cfg: ModelConfig, width: int, *, rngs: nnx.Rngs):
        self.cfg = cfg
        D = cfg.hidden_size
        self.w_gate_DF = param(rngs, (D, width), (axes.EMBED, axes.MLP), cfg)
        self.w_up_DF = param(rngs, (D, width), (axes.EMBED, axes.MLP), cfg)
        self.w_down_FD = param(rngs, (width, D), (axes.MLP, axes.EMBED), cfg)

    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        # 2-D matmuls: with [B, T, D] operands XLA:CPU transposes the activation gradients
        # before every weight-gradient dot (measured ~25% of the backward).
        xm = x.reshape(-1, x.shape[-1])  # [M, D]
        g = jnp.einsum("MD,DF->MF", xm, weight(self.w_gate_DF, cfg))
        u = jnp.einsum("MD,DF->MF", xm, weight(self.w_up_DF, cfg))
        y = jnp.einsum("MF,FD->MD", jax.nn.silu(g) * u, weight(self.w_down_FD, cfg))
        return y.reshape(x.shape)  # [..., D]
