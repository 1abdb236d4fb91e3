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
from jaxmoe.layers.params import RouterBias, param


class Routing(NamedTuple):
    weights: jax.Array  # [M, K] float32, renormalised and scaled
    experts: jax.Array  # [M, K] int32
    scores: jax.Array   # [M, E] float32 original affinities (for balance losses)


def route(logits: jax.Array, bias: jax.Array | None, cfg: ModelConfig) -> Routing:
    """Pure routing math on router logits [M, E] (float32).

    With `moe_impl="pallas"` the fused Pallas router kernel computes the same result.
    """
    logits = logits.astype(jnp.float32)
    if cfg.moe_impl == "pallas":
        from jaxmoe.kernels.router import ops, reference

        return Routing(*ops.route(logits, bias, reference.RouterSpec.from_config(cfg)))
    if cfg.scoring_func == "sigmoid":
        scores = jax.nn.sigmoid(logits)
    else:
        scores = jax.nn.softmax(logits, axis=-1)
    sel = scores if bias is None else scores + bias.astype(jnp.float32)
    G, M, E = cfg.routing_groups, logits.shape[0], logits.shape[-1]
    if G > 1:
        grouped = sel.reshape(M, G, E // G)  # [M, G, E/G]: experts are contiguous per group
        if cfg.topk_method == "noaux_tc":
            group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [M, G]
        else:
            group_score = grouped.max(-1)
        _, keep = jax.lax.top_k(group_score, cfg.routing_topk_group)  # [M, topk_group]
        keep_mask = jnp.zeros((M, G), bool).at[jnp.arange(M)[:, None], keep].set(True)
        sel = jnp.where(keep_mask[:, :, None], grouped, -jnp.inf).reshape(M, E)
    _, experts = jax.lax.top_k(sel, cfg.num_experts_per_tok)
    weights = jnp.take_along_axis(scores, experts, axis=-1)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return Routing(weights * cfg.routed_scaling_factor, experts.astype(jnp.int32), scores)


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
