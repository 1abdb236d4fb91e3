"""int8 weight-only routed experts: symmetric, one scale per output channel of each expert.

`quantize_experts_int8(model)` replaces the routed-expert weights of every MoE layer (the
scanned MoE stack and MTP layers) by `Int8Weight`: q int8 in jaxmoe's layout ([..., E, in, out])
and scale float32 [..., E, 1, out] = amax over the input axis / 127. Layers read it through
`jaxmoe.layers.params.weight` (`effective_weight`: q * scale in the compute dtype), one layer at
a time inside the scan. The routed experts are almost all of a DeepSeek model's weights (V3:
656B of 671B), so this quarters their float32 bytes (halves bfloat16's). FP8 expert weights
are requantised from their dequantised values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe.config import ModelConfig
from jaxmoe.layers.params import weight
from jaxmoe.quant.fp8 import QuantValue

EXPERT_WEIGHTS = ("w_gate_EDF", "w_up_EDF", "w_down_EFD")


class Int8Weight(nnx.Module):
    def __init__(self, q, scale):
        self.q = QuantValue(q)          # [..., in, out] int8
        self.scale = QuantValue(scale)  # [..., 1, out] float32

    def effective_weight(self, cfg: ModelConfig) -> jax.Array:
        return (self.q[...].astype(jnp.float32) * self.scale[...]).astype(cfg.dtype)


@jax.jit
def quantize_int8(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """w [..., in, out] -> (int8 [..., in, out], scale float32 [..., 1, out]); round to
    nearest, |q| <= 127, scale 1 for an all-zero channel."""
    w = w.astype(jnp.float32)
    amax = jnp.abs(w).max(axis=-2, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    return jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8), scale


def _moe_blocks(model):
    if model.moe_layers is not None:
        yield model.moe_layers.ffn
    for m in model.mtp:
        if hasattr(m.layer.ffn, "w_gate_EDF"):
            yield m.layer.ffn


def quantize_experts_int8(model):
    """Routed-expert weights -> Int8Weight (in place); returns the model."""
    cfg = model.cfg.replace(dtype="float32")  # read the current weights at full precision
    for ffn in _moe_blocks(model):
        for name in EXPERT_WEIGHTS:
            var = getattr(ffn, name)
            if isinstance(var, Int8Weight):
                continue
            q, s = quantize_int8(weight(var, cfg))
            setattr(ffn, name, Int8Weight(q, s))
    return model
