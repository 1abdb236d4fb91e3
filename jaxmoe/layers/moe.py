"""Mixture of experts: router + stacked routed experts [E, ...] + the fused shared experts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe import axes
from jaxmoe.config import ModelConfig
from jaxmoe.kernels import dispatch
from jaxmoe.layers.mlp import MLP
from jaxmoe.layers.params import param, weight
from jaxmoe.layers.router import Router, Routing
from jaxmoe.parallel import ep
from jaxmoe.parallel.context import current_ep
from jaxmoe.parallel.sharding import constrain


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        E, D, F = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.router = Router(cfg, rngs=rngs)
        ax_in = (axes.EXPERT, axes.EMBED, axes.EXPERT_MLP)
        self.w_gate_EDF = param(rngs, (E, D, F), ax_in, cfg)
        self.w_up_EDF = param(rngs, (E, D, F), ax_in, cfg)
        self.w_down_EFD = param(rngs, (E, F, D), (axes.EXPERT, axes.EXPERT_MLP, axes.EMBED), cfg)
        self.shared = MLP(cfg, cfg.shared_intermediate_size, rngs=rngs) if cfg.n_shared_experts else None

    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict]:
        """x [B, T, D] -> (y [B, T, D], aux with per-expert counts and the sequence balance term)."""
        cfg = self.cfg
        B, T, D = x.shape
        # the flattened tokens stay split like the batch rows they come from (under a layout)
        xm = constrain(x.reshape(B * T, D), (axes.ACT_TOKENS, axes.ACT_EMBED))  # [B, T, D] -> [M, D]
        r = self.router(xm)
        keep = dropped = None
        if cfg.moe_capacity_factor is not None:
            keep, dropped = dispatch.capacity_keep(r.experts, cfg.n_routed_experts, cfg.moe_capacity_factor)
        if r.used is not None:  # top-p routing: unused slots (weight 0) are not computed
            keep = r.used if keep is None else keep & r.used
        w_experts = (weight(self.w_gate_EDF, cfg), weight(self.w_up_EDF, cfg), weight(self.w_down_EFD, cfg))
        spec = current_ep()
        if spec is None:
            y = dispatch.experts_swiglu(xm, r.weights, r.experts, *w_experts, impl=resolve_impl(cfg.moe_impl),
                                        keep=keep)
        else:  # expert-parallel (jaxmoe/parallel/ep.py); pairs its buffers drop add to the count
            y, ep_dropped = ep.experts_swiglu_ep(xm, r.weights, r.experts, *w_experts, spec=spec,
                                                 impl=resolve_impl(cfg.moe_impl), keep=keep)
            if ep_dropped is not None:
                dropped = ep_dropped if dropped is None else dropped + ep_dropped
        y = y.reshape(B, T, D)  # [M, D] -> [B, T, D]
        if self.shared is not None:
            y = y + self.shared(x)
        return y, routing_stats(r, B, T, cfg, dropped)


def resolve_impl(impl: str) -> str:
    return dispatch.default_impl() if impl == "auto" else impl


def routing_stats(r: Routing, B: int, T: int, cfg: ModelConfig, dropped: jax.Array | None = None) -> dict:
    """Per-layer expert counts [E] and the sequence-wise balance term sum_i f_i P_i (spec §11),
    averaged over the batch; the trainer multiplies it by alpha. With a capacity factor also
    "dropped": the (token, expert) pairs over capacity (int32); counts are the routed choices.
    Under top-p routing only the used slots count, and f_i divides by each sequence's own number
    of (token, expert) pairs instead of K*T. "score_entropy": the mean per-token entropy of the
    normalised scores (the sparsity term of staged training)."""
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    onehot = jax.nn.one_hot(r.experts, E, dtype=jnp.float32)  # [M, K, E]
    if r.used is not None:
        onehot = onehot * r.used[..., None]
    chosen = onehot.sum(1).reshape(B, T, E)  # [M, K, E] -> [M, E] -> [B, T, E]
    if r.used is None:
        f = chosen.sum(1) * (E / (K * T))  # [B, E]
    else:
        f = chosen.sum(1) * E / jnp.maximum(chosen.sum((1, 2)), 1.0)[:, None]  # [B, E]
    s = r.scores.reshape(B, T, E)  # [M, E] -> [B, T, E]
    q = s / s.sum(-1, keepdims=True)  # [B, T, E]
    p = q.mean(1)  # [B, E]
    entropy = -(q * jnp.log(jnp.maximum(q, 1e-30))).sum(-1).mean()
    stats = {"counts": chosen.sum((0, 1)), "seq_balance": (f * p).sum(-1).mean(),
             "score_entropy": entropy}
    if dropped is not None:
        stats["dropped"] = dropped
    return stats
