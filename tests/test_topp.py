"""Dynamic top-p routing (ModelConfig.router_top_p; kernels/router/reference.py): p = 1 with
max k = top_k is the standard router; per token the kept set is the smallest reaching p within
[min k, max k] (checked against a numpy statement of the rule); gradients flow; the MoE counts only
the used slots; the Pallas router path gives the same routing; the config names bad fields."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxmoe
from jaxmoe.config import ConfigError
from jaxmoe.kernels.router import ops as router_ops
from jaxmoe.kernels.router import reference as R
from jaxmoe.layers.moe import MoE

V3 = dict(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2)   # sigmoid, bias
V2 = dict(n_routed_experts=12, num_experts_per_tok=3, n_group=1, topk_group=1, topk_method="greedy",
          scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.5)


def logits_bias(E, T=300, seed=0):
    rng = np.random.RandomState(seed)
    return (jnp.asarray(2.0 * rng.randn(T, E), jnp.float32),
            jnp.asarray(0.3 * rng.randn(E), jnp.float32))


@pytest.mark.parametrize("arch", [V3, V2])
def test_p1_with_max_k_top_k_is_the_standard_router(arch):
    cfg = jaxmoe.get_preset("tiny", **arch)
    lg, b = logits_bias(cfg.n_routed_experts)
    b = b if cfg.has_router_bias else None
    w, ids, s = R.route(lg, b, R.RouterSpec.from_config(cfg))
    w1, ids1, s1, used = R.route_top_p(lg, b, R.RouterSpec.from_config(cfg.replace(router_top_p=1.0)))
    assert used.all()
    np.testing.assert_array_equal(ids1, ids)
    np.testing.assert_array_equal(w1, w)
    np.testing.assert_array_equal(s1, s)


def kept_by_rule(share_sorted, p, min_k, max_k):
    """The rule in numpy: the smallest prefix of the descending shares whose sum reaches p."""
    for k in range(1, max_k + 1):
        if share_sorted[:k].sum() >= p - 1e-6:
            return min(max(k, min_k), max_k)
    return max_k


@pytest.mark.parametrize("arch", [V3, V2])
@pytest.mark.parametrize("p,min_k,max_k", [(0.5, 1, 6), (0.8, 2, 8), (0.3, 3, 5)])
def test_experts_per_token_is_the_smallest_set_within_bounds(arch, p, min_k, max_k):
    cfg = jaxmoe.get_preset("tiny", **arch).replace(router_top_p=p, router_min_k=min_k,
                                                    router_max_k=max_k)
    spec = R.RouterSpec.from_config(cfg)
    assert spec.top_k == max_k and spec.min_k == min_k
    lg, b = logits_bias(cfg.n_routed_experts, seed=1)
    b = b if cfg.has_router_bias else None
    w, ids, s, used = (np.asarray(a) for a in R.route_top_p(lg, b, spec))
    k = used.sum(-1)
    assert k.min() >= min_k and k.max() <= max_k
    assert len(np.unique(k)) > 1 or min_k == 3  # (p 0.3: min k binds for every token)
    cand = np.take_along_axis(s, ids, -1)  # [T, max_k]
    share = cand / cand.sum(-1, keepdims=True)
    for t in range(len(k)):
        want = kept_by_rule(np.sort(share[t])[::-1], p, min_k, max_k)
        assert k[t] == want, (t, k[t], want)
        assert share[t][used[t]].min() >= share[t][~used[t]].max(initial=0.0)  # the best ones
    assert (w[~used] == 0).all() and (w[used] > 0).all()
    if cfg.norm_topk_prob:
        np.testing.assert_allclose(w.sum(-1), cfg.routed_scaling_factor, rtol=1e-5)
    # the candidates are the standard router's top max_k
    np.testing.assert_array_equal(ids, R.route(lg, b, spec)[1])


def test_gradients_flow_through_the_kept_weights():
    cfg = jaxmoe.get_preset("tiny", **V3).replace(router_top_p=0.6, router_min_k=1, router_max_k=6)
    spec = R.RouterSpec.from_config(cfg)
    lg, b = logits_bias(cfg.n_routed_experts, T=64, seed=2)
    c = jnp.asarray(np.random.RandomState(3).randn(64, 6), jnp.float32)
    g = jax.grad(lambda l: (R.route_top_p(l, b, spec)[0] * c).sum())(lg)
    _, ids, _, used = R.route_top_p(lg, b, spec)
    g = np.asarray(g)
    assert np.isfinite(g).all()
    touched = np.zeros(g.shape, bool)
    np.put_along_axis(touched, np.asarray(ids), np.asarray(used), -1)
    assert (np.abs(g[touched]) > 0).mean() > 0.9 and (g[~touched] == 0).all()


def test_moe_counts_used_slots_and_matches_standard_at_p1():
    base = jaxmoe.get_preset("tiny", **V3, moe_impl="segment")
    x = jnp.asarray(np.random.RandomState(4).randn(2, 24, base.hidden_size), jnp.float32)
    moe = MoE(base, rngs=nnx.Rngs(0))
    g, st = nnx.split(moe)

    def run(cfg):
        m = nnx.merge(g, st)
        m.cfg = m.router.cfg = cfg
        return jax.jit(lambda x: m(x))(x)

    y0, a0 = run(base)
    y1, a1 = run(base.replace(router_top_p=1.0))
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(a1["counts"], a0["counts"])
    np.testing.assert_allclose(a1["seq_balance"], a0["seq_balance"], rtol=1e-6)
    cfg = base.replace(router_top_p=0.5, router_min_k=1, router_max_k=6)
    y2, a2 = run(cfg)
    dense, _ = run(cfg.replace(moe_impl="dense"))  # masked zero-weight slots: the same output
    np.testing.assert_allclose(y2, dense, rtol=1e-5, atol=1e-5)
    logits = x.reshape(-1, base.hidden_size) @ st["router"]["w_DE"].get_value()
    _, _, _, used = R.route_top_p(logits, st["router"]["bias_E"].get_value(),
                                  R.RouterSpec.from_config(cfg))
    assert float(a2["counts"].sum()) == float(used.sum()) < 48 * 6  # unused slots not counted
    assert np.isfinite(float(a2["seq_balance"]))
    m = nnx.merge(g, st)
    m.cfg = m.router.cfg = cfg
    g2, st2 = nnx.split(m)
    grads = jax.jit(jax.grad(lambda s: (nnx.merge(g2, s)(x)[0] ** 2).sum()))(st2)
    gw = np.asarray(grads["router"]["w_DE"].get_value())
    assert np.isfinite(gw).all() and np.abs(gw).max() > 0  # through the kept weights


def test_pallas_router_path_supports_top_p():
    cfg = jaxmoe.get_preset("tiny", **V3).replace(router_top_p=0.7, router_min_k=2, router_max_k=5)
    spec = R.RouterSpec.from_config(cfg)
    lg, b = logits_bias(cfg.n_routed_experts, T=40, seed=5)
    pallas = lambda l, bb, sp: router_ops.route(l, bb, sp, platform="gpu", interpret=True)  # noqa
    for a, bb in zip(R.route_top_p(lg, b, spec, select=pallas), R.route_top_p(lg, b, spec)):
        np.testing.assert_allclose(a, bb, rtol=1e-6, atol=1e-7)


def test_config_validation_names_the_field():
    cfg = jaxmoe.get_preset("tiny")
    with pytest.raises(ConfigError, match="router_top_p"):
        cfg.replace(router_top_p=1.5)
    with pytest.raises(ConfigError, match="router_max_k"):
        cfg.replace(router_top_p=0.9, router_max_k=5)  # 4 experts in the kept group
    with pytest.raises(ConfigError, match="router_min_k"):
        cfg.replace(router_top_p=0.9, router_min_k=3, router_max_k=2)
    with pytest.raises(ConfigError, match="moe_capacity_factor"):
        cfg.replace(router_top_p=0.9, moe_capacity_factor=1.0)
    assert cfg.replace(router_top_p=0.9).routing_min_k == 2
    assert cfg.routing_max_k == cfg.num_experts_per_tok
