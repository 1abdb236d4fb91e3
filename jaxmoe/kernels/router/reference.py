"""Plain-jnp router: the one implementation of the routing math (`jaxmoe.layers.router.route` calls it)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxmoe.nucleus import nucleus_keep


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
    # Dynamic top-p (None: off): of the top_k candidates keep the smallest set whose renormalised
    # scores reach top_p, at least min_k (`top_p_keep`); the others get weight 0.
    top_p: float | None = None
    min_k: int = 1

    def __post_init__(self):
        if self.scoring not in ("sigmoid", "softmax") or self.group_score not in ("top2", "max"):
            raise ValueError(f"bad RouterSpec {self}")
        if self.top_p is not None and not (0.0 < self.top_p <= 1.0 and 1 <= self.min_k <= self.top_k):
            raise ValueError(f"bad top-p bounds in {self}: need 0 < top_p <= 1, 1 <= min_k <= top_k")
        if self.num_experts % self.n_group or not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"bad groups in {self}")
        if not 1 <= self.top_k <= self.num_experts // self.n_group * self.topk_group:
            raise ValueError(f"top_k={self.top_k} exceeds the experts of the kept groups in {self}")

    @classmethod
    def from_config(cls, cfg) -> "RouterSpec":
        """From a `ModelConfig` (its routing_groups / routing_topk_group, so "greedy" means one group)."""
        top_p = getattr(cfg, "router_top_p", None)
        return cls(num_experts=cfg.n_routed_experts, top_k=cfg.routing_max_k,
                   n_group=cfg.routing_groups, topk_group=cfg.routing_topk_group,
                   group_score="top2" if cfg.topk_method == "noaux_tc" else "max",
                   scoring=cfg.scoring_func, norm=cfg.norm_topk_prob,
                   scale=float(cfg.routed_scaling_factor), top_p=top_p,
                   min_k=cfg.routing_min_k if top_p is not None else 1)


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
        sel = jnp.where(mask[:, :, None], grouped, -jnp.inf).reshape(T, E)  # [T, G, E/G] -> [T, E]
    _, ids = jax.lax.top_k(sel, spec.top_k)
    ids = ids.astype(jnp.int32)
    w, _ = weights_from_ids(logits, ids, spec)
    return w, ids, scores


def top_p_keep(ids: jax.Array, scores: jax.Array, spec: RouterSpec) -> jax.Array:
    """used [T, K] bool: per token, of the K candidate experts `ids` keep the smallest set whose
    scores, renormalised over the candidates, reach top_p - taken in descending score order -
    bounded to [min_k, K]. Slots keep their order (no reshuffle), so with every slot kept the
    weights are exactly the plain router's. top_p == 1 keeps all K (no rounding shortfall)."""
    if spec.top_p >= 1.0:
        return jnp.ones(ids.shape, bool)
    s = jnp.take_along_axis(scores, ids, axis=-1)  # [T, K] unbiased affinities of the candidates
    return nucleus_keep(s / (s.sum(-1, keepdims=True) + 1e-20), spec.top_p, spec.min_k)


def weights_top_p(scores: jax.Array, ids: jax.Array, used: jax.Array, spec: RouterSpec) -> jax.Array:
    """The plain router's weights over the kept slots only (renormalised over them when `norm`),
    0 in the unused ones. Differentiable in the scores."""
    w = jnp.where(used, jnp.take_along_axis(scores, ids, axis=-1), 0.0)
    if spec.norm:
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return w * spec.scale


def route_top_p(logits: jax.Array, bias: jax.Array | None, spec: RouterSpec, select=None):
    """Dynamic top-p routing: the top_k candidates of `route` (or `select`, same signature: the
    Pallas kernel), then `top_p_keep`. -> (weights [T, K], ids [T, K], scores [T, E], used [T, K])."""
    _, ids, scores = (select or route)(logits, bias, spec)
    used = top_p_keep(ids, jax.lax.stop_gradient(scores), spec)
    return weights_top_p(scores, ids, used, spec), ids, scores, used
