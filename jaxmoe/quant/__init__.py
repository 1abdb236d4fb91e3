"""Quantized weight storage read through `jaxmoe.layers.params.weight` (`effective_weight`):
FP8 e4m3 with 128x128 block scales as published (`fp8`), int8 weight-only experts (`int8`)."""

from __future__ import annotations

import jax
from flax import nnx

from jaxmoe.quant.fp8 import (FP8Block, QuantValue, dequantize_model, load_hf_fp8,
                              load_orbax_fp8, quantize_fp8)
from jaxmoe.quant.int8 import Int8Weight, quantize_experts_int8

__all__ = ["FP8Block", "Int8Weight", "QuantValue", "dequantize_model", "load_hf_fp8",
           "load_orbax_fp8", "quantize_experts_int8", "quantize_fp8", "weight_bytes"]


def weight_bytes(model) -> int:
    """Bytes of every array in the model's state (weights, scales, router biases)."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model)))
