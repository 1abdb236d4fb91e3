"""Where transformers and the official DeepSeek code may differ (dsv3-spec §9): jaxmoe against the spec
reference functions (official semantics), with the config deciding where it speaks."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxmoe
import reference as ref
from jaxmoe import ModelConfig
from jaxmoe.layers import rope
from jaxmoe.layers.mla import MLA
from jaxmoe.layers.router import route


# ----------------------------------------------------------------------------------------------- router
def _cfg(E, G, tg, K, method="noaux_tc", norm=True, scale=2.5):
    func = "sigmoid" if method == "noaux_tc" else "softmax"
    return jaxmoe.tiny(n_routed_experts=E, n_group=G, topk_group=tg, num_experts_per_tok=K, topk_method=method,
                       scoring_func=func, norm_topk_prob=norm, routed_scaling_factor=scale)


def _ref(cfg, logits, bias, mask_value=-np.inf, group_score=None):
    """router_ref on logits (x = logits, w = identity), with the rule the config names."""
    E = cfg.n_routed_experts
    if group_score is None:
        group_score = "top2_sum" if cfg.topk_method == "noaux_tc" else "max"
    return ref.router_ref(np.asarray(logits, np.float64), np.eye(E), bias, score_func=cfg.scoring_func,
                          n_group=cfg.routing_groups, topk_group=cfg.routing_topk_group,
                          top_k=cfg.num_experts_per_tok, group_score=group_score,
                          norm_topk_prob=cfg.norm_topk_prob, route_scale=cfg.routed_scaling_factor,
                          mask_value=mask_value)


def _ours(cfg, logits, bias):
    r = route(jnp.asarray(logits, jnp.float32), None if bias is None else jnp.asarray(bias, jnp.float32), cfg)
    idx, w = np.asarray(r.experts), np.asarray(r.weights)
    order = np.argsort(idx, axis=-1)
    return np.take_along_axis(w, order, -1), np.take_along_axis(idx, order, -1), np.asarray(r.scores)


def _inputs(cfg, T=64, seed=0, bias_std=0.3):
    rng = np.random.default_rng(seed)
    logits = (2.0 * rng.standard_normal((T, cfg.n_routed_experts))).astype(np.float32)
    bias = (bias_std * rng.standard_normal(cfg.n_routed_experts)).astype(np.float32) if cfg.has_router_bias else None
    return logits, bias


def _assert_same(cfg, logits, bias, **kw):
    w, idx, _ = _ours(cfg, logits, bias)
    w_ref, idx_ref = _ref(cfg, logits, bias, **kw)
    np.testing.assert_array_equal(idx, idx_ref)
    np.testing.assert_allclose(w, w_ref, rtol=0, atol=1e-6)
    return idx_ref


@pytest.mark.parametrize("E,G,tg,K", [(6, 3, 2, 3), (256, 8, 4, 8)])
def test_group_mask_is_minus_inf(E, G, tg, K):
    """Every biased score in the kept groups is strongly negative: 0.0-masking (HF) would pick masked experts."""
    cfg = _cfg(E, G, tg, K)
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((64, E)).astype(np.float32)
    bias = (-2.0 - rng.random(E)).astype(np.float32)  # s + b in (-3, -1) everywhere
    idx = _assert_same(cfg, logits, bias)
    _, idx_zero = _ref(cfg, logits, bias, mask_value=0.0)
    assert (idx != idx_zero).any(axis=-1).all()  # the construction really separates the two maskings
    # all chosen experts come from at most topk_group groups
    assert max(len(set(row // (E // G))) for row in idx) <= tg


@pytest.mark.parametrize("E,G,tg,K", [(6, 3, 2, 2), (256, 8, 4, 8)])
@pytest.mark.parametrize("method", ["noaux_tc", "group_limited_greedy"])
def test_group_score_rule(method, E, G, tg, K):
    """noaux_tc: group score = sum of the top-2 biased scores; group_limited_greedy: the max."""
    cfg = _cfg(E, G, tg, K, method=method, norm=method == "noaux_tc")
    hits = 0
    for seed in range(3):
        logits, bias = _inputs(cfg, seed=seed)
        idx = _assert_same(cfg, logits, bias)
        other = "max" if method == "noaux_tc" else "top2_sum"
        hits += (idx != _ref(cfg, logits, bias, group_score=other)[1]).any(-1).sum()
    assert hits > 0  # the inputs distinguish the two group-score rules


@pytest.mark.parametrize("E,G,K", [(6, 3, 4), (256, 8, 8)])
def test_greedy_ignores_groups(E, G, K):
    cfg = _cfg(E, G, 1, K, method="greedy", norm=False, scale=1.0)
    assert cfg.routing_groups == 1
    logits, bias = _inputs(cfg, seed=3)
    w, idx, _ = _ours(cfg, logits, bias)
    w_ref, idx_ref = ref.router_ref(logits, np.eye(E), None, score_func="softmax", n_group=1, topk_group=1,
                                    top_k=K, norm_topk_prob=False, route_scale=1.0)
    np.testing.assert_array_equal(idx, idx_ref)
    np.testing.assert_allclose(w, w_ref, rtol=0, atol=1e-6)
    assert max(len(set(row // (E // G))) for row in idx) > 1  # would be 1 if topk_group=1 were applied


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("method", ["noaux_tc", "group_limited_greedy"])
def test_renormalisation_follows_norm_topk_prob(method, norm):
    cfg = _cfg(256, 8, 4, 8, method=method, norm=norm, scale=2.5)
    logits, bias = _inputs(cfg, seed=4, bias_std=1.0)  # large bias: any leak into the weights shows
    _assert_same(cfg, logits, bias)
    w, idx, scores = _ours(cfg, logits, bias)
    l64 = logits.astype(np.float64)
    s = 1 / (1 + np.exp(-l64)) if method == "noaux_tc" else np.exp(l64) / np.exp(l64).sum(-1, keepdims=True)
    np.testing.assert_allclose(scores, s, rtol=1e-6, atol=1e-7)  # Routing.scores = original affinities
    picked = np.take_along_axis(s, idx, -1)  # ORIGINAL scores: the bias never enters the weights
    want = 2.5 * (picked / picked.sum(-1, keepdims=True) if norm else picked)  # scaling after normalisation
    np.testing.assert_allclose(w, want, rtol=1e-5, atol=1e-7)
    if norm:
        np.testing.assert_allclose(w.sum(-1), 2.5, rtol=1e-6)


def _check_valid_choice(cfg, sel, idx, w, s):
    """A valid top-k under ties: unique experts from <= topk_group groups whose scores reach the cut, no
    unchosen expert of a chosen/surely-kept group beats a chosen one, weights = scaled chosen scores."""
    E, G, tg, K = cfg.n_routed_experts, cfg.routing_groups, cfg.routing_topk_group, cfg.num_experts_per_tok
    n = E // G
    for t in range(sel.shape[0]):
        row = idx[t]
        assert len(set(row.tolist())) == K and row.min() >= 0 and row.max() < E
        g = sel[t].reshape(G, n)  # float32, as routed: exact ties stay ties
        gs = np.sort(g, -1)[:, -2:].sum(-1, dtype=np.float32) if cfg.topk_method == "noaux_tc" else g.max(-1)
        cut = np.sort(gs)[-tg]
        groups = set((row // n).tolist())
        assert len(groups) <= tg and all(gs[q] >= cut for q in groups)
        pool = [e for e in range(E) if (e // n in groups or gs[e // n] > cut) and e not in row]
        if pool:
            assert sel[t, row].min() >= sel[t, pool].max()
        p = s[t, row]
        want = p / p.sum() if cfg.norm_topk_prob else p
        np.testing.assert_allclose(w[t], cfg.routed_scaling_factor * want, rtol=1e-6)


@pytest.mark.parametrize("E,G,tg,K", [(6, 3, 2, 3), (256, 8, 4, 8)])
def test_ties_give_a_deterministic_valid_choice(E, G, tg, K):
    cfg = _cfg(E, G, tg, K)
    rng = np.random.default_rng(5)
    flat = np.zeros((4, E), np.float32)                                        # everything ties
    coarse = rng.integers(-1, 2, size=(60, E)).astype(np.float32)               # many partial ties
    for logits in (flat, coarse):
        bias = np.zeros(E, np.float32)
        w, idx, s = _ours(cfg, logits, bias)
        w2, idx2, _ = _ours(cfg, logits, bias)
        np.testing.assert_array_equal(idx, idx2)
        np.testing.assert_array_equal(w, w2)
        _check_valid_choice(cfg, s, idx, w, s.astype(np.float64))
    np.testing.assert_allclose(_ours(cfg, flat, np.zeros(E, np.float32))[0], 2.5 / K, rtol=1e-6)


# ------------------------------------------------------------------------------------------------- YaRN
def _rope_params(c: ModelConfig) -> dict:
    rp = {"rope_type": c.rope_type, "rope_theta": c.rope_theta}
    if c.rope_type == "yarn":
        rp.update(factor=c.rope_factor, original_max_position_embeddings=c.original_max_position_embeddings,
                  beta_fast=c.beta_fast, beta_slow=c.beta_slow, truncate=c.rope_truncate)
        if c.mscale:
            rp["mscale"] = c.mscale
        if c.mscale_all_dim:
            rp["mscale_all_dim"] = c.mscale_all_dim
    return rp


def _yarn_tiny(**kw):
    base = dict(rope_type="yarn", rope_factor=4.0, original_max_position_embeddings=16, max_position_embeddings=64)
    return jaxmoe.tiny(**{**base, **kw})


YARN_CONFIGS = {
    "v3": jaxmoe.deepseek_v3_671b(),
    "v2_lite": jaxmoe.deepseek_v2_lite(),
    "tiny_l16": _yarn_tiny(),
    "tiny_l512_mscale": _yarn_tiny(original_max_position_embeddings=512, max_position_embeddings=2048,
                                   mscale=0.707, mscale_all_dim=0.707),
    "tiny_mscale_diff": _yarn_tiny(original_max_position_embeddings=512, max_position_embeddings=2048,
                                   mscale=1.0, mscale_all_dim=0.707),
    "tiny_no_mscale": ModelConfig.from_hf_config({**jaxmoe.tiny().to_hf_config(), "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}}),
    "theta_beta_r32": _yarn_tiny(qk_rope_head_dim=32, rope_theta=50000.0, beta_fast=16.0, beta_slow=2.0,
                                 original_max_position_embeddings=2048, rope_factor=8.0),
    "no_truncate": _yarn_tiny(qk_rope_head_dim=64, original_max_position_embeddings=4096, rope_factor=40.0,
                              rope_truncate=False),
    # HF semantics: YaRN stays on even when the model length does not exceed the original one (spec §3.3)
    "short_max_len": jaxmoe.deepseek_v3_671b(max_position_embeddings=4096),
}


@pytest.mark.parametrize("name", sorted(YARN_CONFIGS))
def test_yarn_inv_freq_scale_and_factor(name):
    c = YARN_CONFIGS[name]
    rp = _rope_params(c)
    np.testing.assert_allclose(rope.inv_freq(c), ref.inv_freq_ref(c.qk_rope_head_dim, rp), rtol=1e-6)
    np.testing.assert_allclose(c.softmax_scale, ref.softmax_scale_ref(c.qk_head_dim, rp), rtol=1e-12)
    np.testing.assert_allclose(rope.attention_factor(c), ref.rope_attention_factor_ref(rp), rtol=1e-12)


def test_yarn_v3_ramp_and_scales():
    v3, lite = jaxmoe.deepseek_v3_671b(), jaxmoe.deepseek_v2_lite()
    ratio = rope.inv_freq(v3).astype(np.float64) / ref.default_inv_freq_ref(64, 10000.0)
    np.testing.assert_allclose(ratio[:11], 1.0, rtol=1e-6)          # pairs 0..10 unchanged (low = 10)
    np.testing.assert_allclose(ratio[23:], 1 / 40, rtol=1e-6)       # pairs >= 23 divided by 40 (high = 23)
    assert ((ratio[11:23] < 1 - 1e-3) & (ratio[11:23] > 1 / 40 + 1e-4)).all()
    assert abs(v3.softmax_scale - 0.1352338) < 5e-8                 # spec §3.3
    assert abs(lite.softmax_scale - 0.1147214) < 5e-8
    assert rope.attention_factor(v3) == 1.0 and rope.attention_factor(lite) == 1.0
    assert abs(rope.attention_factor(YARN_CONFIGS["tiny_mscale_diff"]) - 1.03699) < 1e-5
    assert abs(rope.attention_factor(YARN_CONFIGS["tiny_no_mscale"]) - 1.13863) < 1e-5


def test_default_rope_is_plain():
    c = jaxmoe.tiny()
    assert c.rope_type == "default"
    np.testing.assert_allclose(rope.inv_freq(c), ref.default_inv_freq_ref(c.qk_rope_head_dim, c.rope_theta),
                               rtol=1e-6)
    assert c.softmax_scale == c.qk_head_dim ** -0.5 and rope.attention_factor(c) == 1.0
    # yarn knobs are ignored under the default rope type
    d = jaxmoe.tiny(rope_factor=40.0, mscale_all_dim=0.707)
    assert d.softmax_scale == c.softmax_scale
    np.testing.assert_array_equal(rope.inv_freq(d), rope.inv_freq(c))


# ------------------------------------------------------------------------------------------ rope layout
@pytest.mark.parametrize("name", ["tiny", "tiny_mscale_diff"])
def test_apply_rope_is_interleaved(name):
    c = jaxmoe.tiny() if name == "tiny" else YARN_CONFIGS[name]
    B, T, N, R = 2, 5, 3, c.qk_rope_head_dim
    rng = np.random.default_rng(6)
    x = rng.standard_normal((B, T, N, R)).astype(np.float32)
    k = rng.standard_normal((B, T, R)).astype(np.float32)
    pos = np.array([np.arange(T), np.arange(T) + 37])
    cos, sin = rope.rope_angles(jnp.asarray(pos), c)
    y, yk = np.asarray(rope.apply_rope(jnp.asarray(x), cos, sin)), np.asarray(rope.apply_rope(jnp.asarray(k), cos, sin))
    rp = _rope_params(c)
    inv, af = ref.inv_freq_ref(R, rp), ref.rope_attention_factor_ref(rp)
    want = np.stack([ref.rope_interleaved_ref(x[b].transpose(1, 0, 2), pos[b], inv, af).transpose(1, 0, 2)
                     for b in range(B)])
    want_k = np.stack([ref.rope_interleaved_ref(k[b], pos[b], inv, af) for b in range(B)])
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(yk, want_k, rtol=1e-5, atol=1e-5)
    # the half-split (rotate_half) layout on the same unpermuted vector is a different map
    ang = pos[:, :, None] * inv[None, None, :]
    cc, ss = np.concatenate([np.cos(ang)] * 2, -1)[:, :, None], np.concatenate([np.sin(ang)] * 2, -1)[:, :, None]
    half = af * (x * cc + np.concatenate([-x[..., R // 2:], x[..., :R // 2]], -1) * ss)
    assert np.abs(y - half).max() > 1e-2


# ----------------------------------------------------------------------------------------- latent norm
def test_latent_norm_eps_comes_from_config():
    c = jaxmoe.tiny(rms_norm_eps=0.25, initializer_range=0.3)
    m = MLA(c, rngs=nnx.Rngs(0))
    assert m.kv_norm.eps == 0.25 and m.q_norm.eps == 0.25
    B, T, D, N = 1, 4, c.hidden_size, c.num_attention_heads
    x = np.random.default_rng(7).standard_normal((B, T, D)).astype(np.float32) * 0.2
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    cos, sin = rope.rope_angles(pos, c)
    y = np.asarray(m(jnp.asarray(x), pos, cos, sin))
    a = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
    w = {"q_a_proj.weight": a(m.wq_a_DQ).T, "q_a_layernorm.weight": a(m.q_norm.scale),
         "q_b_proj.weight": a(m.wq_b_QNJ).reshape(c.q_lora_rank, -1).T,
         "kv_a_proj_with_mqa.weight": a(m.wkv_a_DP).T, "kv_a_layernorm.weight": a(m.kv_norm.scale),
         "kv_b_proj.weight": a(m.wkv_b_CNI).reshape(c.kv_lora_rank, -1).T,
         "o_proj.weight": a(m.wo_NGD).reshape(N * c.v_head_dim, D).T}
    conf = {k: getattr(c, k) for k in ("num_attention_heads", "qk_nope_head_dim", "qk_rope_head_dim",
                                       "v_head_dim", "kv_lora_rank", "rms_norm_eps")}
    conf["rope_parameters"] = _rope_params(c)
    np.testing.assert_allclose(y, ref.mla_ref(x, w, conf), rtol=1e-5, atol=1e-6)
    assert np.abs(y - ref.mla_ref(x, w, {**conf, "rms_norm_eps": 1e-6})).max() > 1e-3  # eps matters here


def test_official_sigmoid_gate_without_bias_ranks_groups_by_max():
    """dsv3-spec §4.2/§9.5: the official Gate has its selection bias only when dim == 7168; a
    sigmoid config of another width routes with unbiased scores and max group scores (the top-2
    sum would pick other experts on these inputs)."""
    args = dict(vocab_size=64, dim=64, inter_dim=64, moe_inter_dim=16, n_layers=2, n_dense_layers=1,
                n_heads=2, n_routed_experts=16, n_shared_experts=1, n_activated_experts=4,
                n_expert_groups=4, n_limited_groups=2, score_func="sigmoid", route_scale=2.5,
                q_lora_rank=0, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    cfg = ModelConfig.from_official_args(args)
    assert not cfg.has_router_bias and cfg.scoring_func == "sigmoid" and cfg.norm_topk_prob
    logits = (2 * np.random.default_rng(1).standard_normal((256, 16))).astype(np.float32)
    r = route(jnp.asarray(logits), jnp.zeros(16, jnp.float32), cfg)
    w_ref, ids_ref = ref.router_ref(logits.astype(np.float64), np.eye(16), None, score_func="sigmoid",
                                    n_group=4, topk_group=2, top_k=4, norm_topk_prob=True,
                                    route_scale=2.5)
    order = np.argsort(np.asarray(r.experts), -1)  # the reference sorts ids ascending
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(r.experts), order, -1), ids_ref)
    np.testing.assert_allclose(np.take_along_axis(np.asarray(r.weights), order, -1), w_ref, rtol=1e-5)
    _, ids_top2 = ref.router_ref(logits.astype(np.float64), np.eye(16), None, score_func="sigmoid",
                                 n_group=4, topk_group=2, top_k=4, norm_topk_prob=True,
                                 route_scale=2.5, group_score="top2_sum")
    assert (np.sort(ids_top2, -1) != np.sort(ids_ref, -1)).any()  # the rules differ here
    for score in ("sigmoid", "softmax"):  # the bias comes with the width, not the scoring
        c = ModelConfig.from_official_args(dict(args, dim=7168, score_func=score))
        assert c.has_router_bias and c.scoring_func == score


def test_bfloat16_load_keeps_the_router_in_float32():
    """dsv3-spec §9.7 and the dtype policy: loading in bfloat16 casts the weights, not the
    router's weight or its e_score_correction_bias (float32, as the release stores the bias)."""
    import parity_util as pu

    m = pu.load(pu.saved("v3"), dtype="bfloat16")
    router = m.moe_layers.ffn.router
    assert router.w_DE[...].dtype == jnp.float32 and router.bias_E[...].dtype == jnp.float32
    assert m.moe_layers.ffn.w_up_EDF[...].dtype == jnp.bfloat16
    assert m.moe_layers.attn.wkv_b_CNI[...].dtype == jnp.bfloat16
    assert np.any(np.asarray(router.bias_E[...]) != 0)  # the checkpoint's values, not a fresh zero
