"""Per-layer parity with transformers (forward hooks, oracle.hf_layer_io): every decoder layer's MLA,
dense MLP / MoE output and router decisions, fed with transformers' own layer inputs; plus naive vs
absorbed MLA on the same layer and input.

Tolerances: router indices identical (both sorted ascending per token), router weights within 1e-6
(absolute), outputs max|ours - hf| / max|hf| <= 1e-5.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import oracle
import parity_util as pu
from jaxmoe.layers.mla import init_latent_cache
from jaxmoe.layers.rope import rope_angles

TOL = 1e-5
# sigmoid/noaux_tc (V3) and softmax (V2) routers, group-limited and greedy, q_lora on (v3, v2) and off
# (v2_greedy), YaRN with T > L0 = 16, YaRN with HF's cos/sin attention factor != 1. (Every config is also
# covered end to end by test_model_parity; absorbed MLA over a cache with spare slots by test_decode.)
# The MoE dispatch rotates over the implementations ("auto" is segment on CPU); test_model_parity runs
# each of them on v3.
CASES = [("v3", "auto"), ("v3_yarn", "dense"), ("v3_yarn_mscale_diff", "segment"), ("v2", "ragged_dot"),
         ("v2_greedy", "dense")]


@pu.jit(static_argnums=0)
def _run_layer(graphdef, state, r):
    """Every output we compare for one layer, fed with transformers' captured inputs `r`."""
    lay = nnx.merge(graphdef, state)
    cfg = lay.cfg
    x = r["attn_in"]
    B, T = x.shape[:2]
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    cos, sin = rope_angles(pos, cfg)
    out = {"attn": lay.attn(x, pos, cos, sin)}
    out["absorbed"], cache = lay.attn.absorbed(x, pos, cos, sin, init_latent_cache(cfg, B, T))
    out["cache_kv"], out["cache_pe"] = cache.kv, cache.pe
    y = lay.ffn(r["mlp_in"])
    if isinstance(y, tuple):
        y, out["counts"] = y[0], y[1]["counts"]
        routing = lay.ffn.router(r["mlp_in"].reshape(B * T, -1))
        out["experts"], out["weights"] = routing.experts, routing.weights
    out["ffn"] = y
    return out


@pytest.fixture(scope="module", params=CASES, ids=[f"{n}-{i}" for n, i in CASES])
def case(request):
    """(name, cfg, transformers records, our records) for every decoder layer."""
    name, impl = request.param
    m = pu.hf_model(name)
    io = oracle.hf_layer_io(m, pu.tokens(m.config.vocab_size))
    model = pu.load(pu.saved(name), moe_impl=impl)
    ours = []
    for i in range(model.cfg.num_hidden_layers):
        graphdef, state = nnx.split(pu.layer(model, i))
        inputs = {k: jnp.asarray(io[i][k]) for k in ("attn_in", "mlp_in")}
        ours.append(jax.tree.map(np.asarray, _run_layer(graphdef, state, inputs)))
    return name, model.cfg, io, ours


def test_mla_matches_hf(case):
    name, cfg, io, ours = case
    for i, (r, o) in enumerate(zip(io, ours)):
        pu.assert_rel(o["attn"], r["attn_out"], TOL, f"{name} layer {i} MLA")


def test_mla_absorbed_matches_naive(case):
    name, cfg, io, ours = case
    for i, (r, o) in enumerate(zip(io, ours)):
        B, T = r["attn_in"].shape[:2]
        pu.assert_rel(o["absorbed"], o["attn"], TOL, f"{name} layer {i} absorbed vs naive MLA")
        assert o["cache_kv"].shape == (B, T, cfg.kv_lora_rank)
        assert o["cache_pe"].shape == (B, T, cfg.qk_rope_head_dim)
        assert (np.abs(o["cache_kv"]).sum(-1) > 0).all() and (np.abs(o["cache_pe"]).sum(-1) > 0).all()


def test_ffn_matches_hf(case):
    name, cfg, io, ours = case
    for i, (r, o) in enumerate(zip(io, ours)):
        kind = "MoE" if cfg.is_moe_layer(i) else "dense MLP"
        assert ("experts" in o) == cfg.is_moe_layer(i) == ("topk_idx" in r)
        pu.assert_rel(o["ffn"], r["mlp_out"], TOL, f"{name} layer {i} {kind}")


def test_router_matches_hf(case):
    name, cfg, io, ours = case
    K, n_moe = cfg.num_experts_per_tok, 0
    for i, (r, o) in enumerate(zip(io, ours)):
        if not cfg.is_moe_layer(i):
            continue
        n_moe += 1
        order = np.argsort(o["experts"], axis=-1, kind="stable")
        experts = np.take_along_axis(o["experts"], order, -1)
        weights = np.take_along_axis(o["weights"], order, -1)
        np.testing.assert_array_equal(experts, r["topk_idx"].reshape(-1, K), err_msg=f"{name} layer {i} experts")
        np.testing.assert_allclose(weights, r["topk_weights"].reshape(-1, K), rtol=0, atol=1e-6,
                                   err_msg=f"{name} layer {i} routing weights")
        counts = np.bincount(r["topk_idx"].ravel(), minlength=cfg.n_routed_experts)
        np.testing.assert_array_equal(o["counts"], counts, err_msg=f"{name} layer {i} expert counts")
    assert n_moe == cfg.num_moe_layers

