"""A low-rank adapter on one weight, applied in weight space:

    W_eff = W + (alpha / r) * (A @ B).reshape(W.shape)      A [.., in, r], B [.., r, out]

`LoRAWeight` takes the place of the adapted `nnx.Param` in its layer; `layers.params.weight()`
sees its `effective_weight` and returns W_eff, so every layer (MLA projections, shared and routed
experts, the dense MLP) is adapted without touching its einsums. The base W is read through
`weight()` itself, so a quantized or bf16 base works the same way. Leading axes of W (the [L]
axis of the scanned stacks, the [E] axis of the stacked experts) are carried by A and B: one
low-rank pair per layer and per expert.

Initialisation as in PEFT: A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0, so W_eff == W at the start.
Dropout is not in here: the trainer applies it to A's input rows (`attach.dropout_adapters`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe.config import ModelConfig
from jaxmoe.layers.params import weight

# Parameter name -> (batch axes, input axes) among the letters of its suffix; the rest are outputs.
# The batch axis E gets one adapter pair per expert; wo_NGD reads the [N, G] head outputs.
LAYOUT: dict[str, tuple[int, int]] = {
    "wq_DNJ": (0, 1), "wq_a_DQ": (0, 1), "wq_b_QNJ": (0, 1), "wkv_a_DP": (0, 1),
    "wkv_b_CNI": (0, 1), "wo_NGD": (0, 2),
    "w_gate_EDF": (1, 1), "w_up_EDF": (1, 1), "w_down_EFD": (1, 1),
    "w_gate_DF": (0, 1), "w_up_DF": (0, 1), "w_down_FD": (0, 1),
}


def split_shape(name: str, shape: tuple[int, ...]) -> tuple[tuple, int, int]:
    """(leading axes incl. the expert axis, flat input size, flat output size) of weight `name`."""
    if name not in LAYOUT:
        raise ValueError(f"no LoRA layout for parameter {name!r}; known: {sorted(LAYOUT)}")
    n_batch, n_in = LAYOUT[name]
    letters = len(name.rsplit("_", 1)[1])
    lead = len(shape) - letters + n_batch  # stack axes ([L]) + batch axes ([E])
    if lead < 0:
        raise ValueError(f"{name}: shape {shape} has fewer axes than its name ({letters})")
    ins = shape[lead:lead + n_in]
    return tuple(shape[:lead]), math.prod(ins), math.prod(shape[lead + n_in:])


@functools.lru_cache(maxsize=None)
def _f32(cfg: ModelConfig) -> ModelConfig:
    """The same config computing in float32: the base is read at full precision before the
    delta is added, then cast once to the compute dtype."""
    return cfg if cfg.dtype == "float32" else cfg.replace(dtype="float32")


def _axes(meta: dict, n: int) -> tuple:
    axes = meta.get("out_sharding")
    return tuple(axes) if axes is not None and len(axes) == n else (None,) * n


class LoRAWeight(nnx.Module):
    """An adapted weight: the frozen base `nnx.Param` plus `lora_a`, `lora_b` (`nnx.LoRAParam`,
    float32). `name` is the base parameter's attribute name (it fixes the in/out axes)."""

    def __init__(self, base: nnx.Variable, name: str, rank: int, alpha: float, key: jax.Array):
        shape = tuple(base.get_value().shape)
        lead, d_in, d_out = split_shape(name, shape)
        self.base = base
        self.name = name
        self.rank = rank
        self.scale = float(alpha) / rank
        # axis names: the base's leading (layer/expert) axes; the input/output axis where it is one
        axes = _axes(base.get_metadata(), len(shape))
        n_batch, n_in = LAYOUT[name]
        k = len(lead)
        a_in = axes[k] if n_in == 1 else None
        b_out = axes[k + n_in] if len(shape) - k - n_in == 1 else None
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(key, lead + (d_in, rank), jnp.float32, -bound, bound)
        self.lora_a = nnx.LoRAParam(a, out_sharding=axes[:k] + (a_in, None), eager_sharding=False)
        self.lora_b = nnx.LoRAParam(jnp.zeros(lead + (rank, d_out), jnp.float32),
                                    out_sharding=axes[:k] + (None, b_out), eager_sharding=False)

    def delta(self) -> jax.Array:
        """(alpha / r) * A @ B in float32, shaped like the base (inside a scan: one layer's)."""
        # X / Y: the base's flattened input / output, A: the rank (jaxmoe/axes.py)
        d = jnp.einsum("...XA,...AY->...XY", self.lora_a[...], self.lora_b[...],
                       precision=jax.lax.Precision.HIGHEST)
        return self.scale * d

    def _sum(self, cfg: ModelConfig) -> jax.Array:
        """W + (alpha/r) A B in float32."""
        w = weight(self.base, _f32(cfg))
        return w + self.delta().reshape(w.shape)  # [..., in, out] -> the base's own axes

    def effective_weight(self, cfg: ModelConfig) -> jax.Array:
        """W + (alpha/r) A B in the compute dtype (what `layers.params.weight()` returns)."""
        return self._sum(cfg).astype(jnp.dtype(cfg.dtype))

    def merged(self, cfg: ModelConfig) -> jax.Array:
        """The folded weight (all leading axes) in `cfg.param_dtype`: a plain parameter again."""
        return self._sum(cfg).astype(jnp.dtype(cfg.param_dtype))
