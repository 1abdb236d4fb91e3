"""Plain-jnp router: the one implementation of the routing math (`jaxmoe.layers.router.route` calls it)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class RouterSpec:
    """Static routing rule. group_score: "top2" (sum of the two best biased scores, noaux_tc) or "max"."""

    num_experts: int
    top_k: int
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "top2"
    scoring: str = "sigmoid"
    norm: bool = True
    scale: float = 1.0

    def __post_init__(self):
        if self.scoring not in ("sigmoid", "softmax") or self.group_score not in ("top2", "max"):
            raise ValueError(f"bad RouterSpec {self}")
        if self.num_experts % self.n_group or not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"bad groups in {self}")
        if not 1 <= self.top_k <= self.num_experts // self.n_group * self.topk_group:
            raise ValueError(f"top_k={self.top_k} exceeds the experts of the kept groups in {self}")

    @classmethod
    def from_config(cls, cfg) -> "RouterSpec":
        """From a `ModelConfig` (its routing_groups / routing_topk_group, so "greedy" means one group)."""
        return cls(num_experts=cfg.n_routed_experts, top_k=cfg.num_experts_per_tok,
                   n_group=cfg.routing_groups, topk_group=cfg.routing_topk_group,
                   group_score="top2" if cfg.topk_method == "noaux_tc" else "max",
                   scoring=cfg.scoring_func, norm=cfg.norm_topk_prob,
                   scale=float(cfg.routed_scaling_factor))


def scores_of(logits: jax.Array, spec: RouterSpec) -> jax.Array:
    logits = logits.astype(jnp.float32)
    return jax.nn.sigmoid(logits) if spec.scoring == "sigmoid" else jax.nn.softmax(logits, axis=-1)


def weights_from_ids(logits: jax.Array, ids: jax.Array, spec: RouterSpec):
    """The differentiable part: (weights [T, K], scores [T, E]) for a fixed choice of experts."""
    scores = scores_of(logits, spec)
    w = jnp.take_along_axis(scores, ids, axis=-1)
    if spec.norm:
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return w * spec.scale, scores


def route(logits: jax.Array, bias: jax.Array | None, spec: RouterSpec):
    """logits [T, E] -> (weights [T, K] f32, expert ids [T, K] int32, scores [T, E] f32)."""
    scores = scores_of(logits, spec)
    sel = scores if bias is None else scores + bias.astype(jnp.float32)
    T, E, G = logits.shape[0], spec.num_experts, spec.n_group
    if G > 1:
        grouped = sel.reshape(T, G, E // G)  # [T, G, E/G]
        if spec.group_score == "top2":
            group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)
        else:
            group_score = grouped.max(-1)
        _, keep = jax.lax.top_k(group_score, spec.topk_group)  # [T, topk_group]
        mask = jnp.zeros((T, G), bool).at[jnp.arange(T)[:, None], keep].set(True)
        sel = jnp.where(mask[:, :, None], grouped, -jnp.inf).reshape(T, E)
    _, ids = jax.lax.top_k(sel, spec.top_k)
    ids = ids.astype(jnp.int32)
    w, _ = weights_from_ids(logits, ids, spec)
    return w, ids, scores
