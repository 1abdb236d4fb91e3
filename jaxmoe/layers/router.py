"""The DeepSeek router (dsv3-spec §4.2), all in float32.

scores s = sigmoid|softmax(x W); selection uses s + e_score_correction_bias, limited to the best
`topk_group` groups (groups outside are masked with -inf, as the official code does since
2025-02); the weights are the ORIGINAL scores of the chosen experts, renormalised when
`norm_topk_prob`, times `routed_scaling_factor`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe import axes
from jaxmoe.config import ModelConfig
from jaxmoe.kernels.router import ops as router_ops
from jaxmoe.kernels.router import reference as router_ref
from jaxmoe.layers.params import RouterBias, param


class Routing(NamedTuple):
    weights: jax.Array  # [M, K] float32, renormalised and scaled
    experts: jax.Array  # [M, K] int32
    scores: jax.Array   # [M, E] float32 original affinities (for balance losses)
    used: jax.Array | None = None  # [M, K] bool slots in use (top-p routing); None: all


def route(logits: jax.Array, bias: jax.Array | None, cfg: ModelConfig) -> Routing:
    """Pure routing math on router logits [M, E] (float32).

    The math lives once, in the router kernel's plain-jnp reference; `moe_impl="pallas"` runs
    the fused Pallas kernel instead, which computes the same result. With `router_top_p` set,
    the router picks `router_max_k` candidates and `used` marks the slots the top-p rule keeps.
    """
    spec = router_ref.RouterSpec.from_config(cfg)
    fn = router_ops.route if cfg.moe_impl == "pallas" else router_ref.route
    if spec.top_p is not None:  # K = router_max_k candidates, then the top-p cut (plain jnp)
        return Routing(*router_ref.route_top_p(logits.astype(jnp.float32), bias, spec, select=fn))
    return Routing(*fn(logits.astype(jnp.float32), bias, spec))


class Router(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        E = cfg.n_routed_experts
        # The router weight stays float32 whatever the parameter dtype (dtype policy).
        self.w_DE = param(rngs, (cfg.hidden_size, E), (axes.EMBED, None), cfg, dtype="float32")
        if cfg.has_router_bias:
            self.bias_E = RouterBias(jnp.zeros((E,), jnp.float32), out_sharding=(None,),
                                     eager_sharding=False)
        else:
            self.bias_E = None

    def __call__(self, x: jax.Array) -> Routing:
        """x [M, D] -> Routing."""
        logits = jnp.einsum("MD,DE->ME", x.astype(jnp.float32), self.w_DE[...],
                            precision=jax.lax.Precision.HIGHEST)
        bias = None if self.bias_E is None else self.bias_E[...]
        return route(logits, bias, self.cfg)
