"""Parameter construction: one place for init, dtype and logical-axis metadata."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe.config import ModelConfig


class RouterBias(nnx.Variable):
    """`e_score_correction_bias`: routing-only state, updated outside the gradient step."""


def dtype_of(name: str):
    return jnp.dtype(name)


def param(rngs: nnx.Rngs | None, shape: tuple[int, ...], axes: tuple[str | None, ...],
          cfg: ModelConfig, init: str = "normal", dtype: str | None = None) -> nnx.Param:
    """An nnx.Param with logical axis names (applied later by pjit_configs, never eagerly)."""
    assert len(shape) == len(axes), (shape, axes)
    dt = dtype_of(dtype or cfg.param_dtype)
    if init == "normal":
        value = cfg.initializer_range * jax.random.normal(rngs.params(), shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    elif init == "zeros":
        value = jnp.zeros(shape, jnp.float32)
    else:
        raise ValueError(f"unknown init {init!r}")
    return nnx.Param(value.astype(dt), out_sharding=axes, eager_sharding=False)


def compute(x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Cast a parameter (or activation) to the compute dtype of the policy."""
    return x.astype(dtype_of(cfg.dtype))


def weight(var: nnx.Variable, cfg: ModelConfig) -> jax.Array:
    """The effective weight of a parameter in the compute dtype. Every layer reads its weights
    through here, so alternative storage (quantized weights, adapters) plugs in at one place."""
    adapted = getattr(var, "effective_weight", None)
    if adapted is not None:  # a jaxmoe.lora.LoRAWeight: base (read through here) + (alpha/r) A B
        return adapted(cfg)
    return compute(var[...], cfg)
