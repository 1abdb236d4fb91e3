"""Self-tests of the test harness (oracle.py, reference.py): pure torch/numpy, no jax (apart from
the bench-config checks, which also build jaxmoe's ModelConfig from the same file)."""

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import oracle
import reference as ref
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as hf2
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf3


def _router(cls, cfg, seed, w_std=0.1, bias_std=0.05, bias_shift=0.0):
    g = torch.Generator().manual_seed(seed)
    r = cls(cfg)
    with torch.no_grad():
        r.weight.copy_(w_std * torch.randn(r.weight.shape, generator=g))
        if hasattr(r, "e_score_correction_bias"):
            b = r.e_score_correction_bias
            b.copy_(bias_std * torch.randn(b.shape, generator=g) + bias_shift)
    return r


def _run_router(r, x):
    with torch.no_grad():
        _, w, idx = r(torch.from_numpy(x))
    order = torch.argsort(idx, -1)
    return torch.gather(w, -1, order).numpy(), torch.gather(idx, -1, order).numpy()


@pytest.mark.parametrize("name,bias_shift", [("v3", 0.0), ("v3_no_norm", 0.0), ("v3_shared0_dense0", 0.0),
                                             ("v3", -2.0)])
def test_router_ref_matches_hf_v3(name, bias_shift):
    # bias_shift -2 makes every biased score negative (issue #741 territory): transformers 5.x V3 masks with
    # -inf, so it still agrees with the official semantics.
    cfg = oracle.make_config(name)
    r = _router(hf3.DeepseekV3TopkRouter, cfg, seed=3, bias_shift=bias_shift)
    x = np.random.default_rng(0).standard_normal((257, cfg.hidden_size)).astype(np.float32)
    w_hf, i_hf = _run_router(r, x)
    w_ref, i_ref = ref.router_ref(
        x, r.weight.detach().numpy(), r.e_score_correction_bias.numpy(), score_func="sigmoid",
        n_group=cfg.n_group, topk_group=cfg.topk_group, top_k=cfg.num_experts_per_tok, group_score="top2_sum",
        norm_topk_prob=cfg.norm_topk_prob, route_scale=cfg.routed_scaling_factor)
    np.testing.assert_array_equal(i_hf, i_ref)
    np.testing.assert_allclose(w_hf, w_ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["v2", "v2_greedy"])
def test_router_ref_matches_hf_v2(name):
    # HF V2 masks dropped groups with 0.0 (official: -inf). With softmax scores (all > 0) and at least top_k
    # experts in the kept groups, a masked expert can never win, so both agree.
    cfg = oracle.make_config(name)
    r = _router(hf2.DeepseekV2TopkRouter, cfg, seed=4, w_std=0.2)
    x = np.random.default_rng(1).standard_normal((257, cfg.hidden_size)).astype(np.float32)
    w_hf, i_hf = _run_router(r, x)
    kw = dict(score_func="softmax", top_k=cfg.num_experts_per_tok, norm_topk_prob=False,
              route_scale=cfg.routed_scaling_factor)
    if cfg.topk_method == "group_limited_greedy":
        kw.update(n_group=cfg.n_group, topk_group=cfg.topk_group, group_score="max")
    w_ref, i_ref = ref.router_ref(x, r.weight.detach().numpy(), None, **kw)
    np.testing.assert_array_equal(i_hf, i_ref)
    np.testing.assert_allclose(w_hf, w_ref, rtol=0, atol=1e-6)
    # 0.0 masking gives the same result as -inf here
    w0, i0 = ref.router_ref(x, r.weight.detach().numpy(), None, mask_value=0.0, **kw)
    np.testing.assert_array_equal(i0, i_ref)


def test_hf_v2_ignores_norm_topk_prob():
    kw = dict(oracle.CONFIGS["v2"], norm_topk_prob=True)
    cfg = oracle.make_config(kw)
    r = _router(hf2.DeepseekV2TopkRouter, cfg, seed=5, w_std=0.2)
    x = np.random.default_rng(2).standard_normal((31, cfg.hidden_size)).astype(np.float32)
    w_hf, _ = _run_router(r, x)
    w_ref, _ = ref.router_ref(x, r.weight.detach().numpy(), None, score_func="softmax", n_group=3, topk_group=2,
                              top_k=2, group_score="max", norm_topk_prob=False, route_scale=1.5)
    np.testing.assert_allclose(w_hf, w_ref, atol=1e-6)  # not renormalised although norm_topk_prob=True


@pytest.mark.parametrize("name", ["v3", "v3_yarn", "v3_yarn_mscale", "v3_yarn_mscale_diff", "v3_yarn_no_mscale",
                                  "v2"])
def test_rope_and_scale_match_hf(name):
    cfg = oracle.make_config(name)
    rot = hf3.DeepseekV3RotaryEmbedding(cfg)
    inv = ref.inv_freq_ref(cfg.qk_rope_head_dim, cfg.rope_parameters)
    np.testing.assert_allclose(rot.inv_freq.numpy(), inv, rtol=1e-6)
    assert rot.attention_scaling == pytest.approx(ref.rope_attention_factor_ref(cfg.rope_parameters), rel=1e-12)
    attn = (hf3.DeepseekV3Attention if name != "v2" else hf2.DeepseekV2Attention)(cfg, 0)
    assert attn.scaling == pytest.approx(ref.softmax_scale_ref(cfg.qk_head_dim, cfg.rope_parameters), rel=1e-12)


def test_yarn_full_size_numbers():
    rp = dict(rope_type="yarn", rope_theta=10000.0, factor=40.0, original_max_position_embeddings=4096,
              beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0)
    cfg = oracle.make_config(dict(oracle.CONFIGS["v3"], qk_rope_head_dim=64, qk_nope_head_dim=128,
                                  max_position_embeddings=163840, rope_parameters=rp))
    inv = ref.yarn_inv_freq_ref(64, 10000.0, 40.0, 4096)
    np.testing.assert_allclose(hf3.DeepseekV3RotaryEmbedding(cfg).inv_freq.numpy(), inv, rtol=1e-6)
    f = ref.default_inv_freq_ref(64, 10000.0)
    np.testing.assert_allclose(inv[:11], f[:11])
    np.testing.assert_allclose(inv[23:], f[23:] / 40)
    assert ref.softmax_scale_ref(192, rp) == pytest.approx(0.1352338, abs=1e-7)
    assert ref.softmax_scale_ref(192, dict(rp, mscale=0.707, mscale_all_dim=0.707)) == pytest.approx(0.1147214,
                                                                                                    abs=1e-7)


@pytest.mark.parametrize("name", ["v3", "v3_yarn_mscale_diff"])
def test_rope_interleaved_ref_qk_matches_hf(name):
    cfg = oracle.make_config(name)
    R, T = cfg.qk_rope_head_dim, 23
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 3, T, R, generator=g), torch.randn(1, 1, T, R, generator=g)
    pos = torch.arange(T)[None]
    cos, sin = hf3.DeepseekV3RotaryEmbedding(cfg)(q, pos)
    qh, kh = hf3.apply_rotary_pos_emb_interleave(q, k, cos, sin)
    inv = ref.inv_freq_ref(R, cfg.rope_parameters)
    af = ref.rope_attention_factor_ref(cfg.rope_parameters)
    qr, kr = (ref.rope_interleaved_ref(t.numpy(), np.arange(T), inv, af) for t in (q, k))
    np.testing.assert_allclose((qh @ kh.transpose(-1, -2)).numpy(), qr @ np.swapaxes(kr, -1, -2), atol=2e-5)
    # DeepSeek-V2's complex-number RoPE is the official layout: equal element by element
    freqs_cis = hf2.DeepseekV2RotaryEmbedding(cfg)(q, pos)
    q2, _ = hf2.apply_rotary_emb(q, k, freqs_cis)
    np.testing.assert_allclose(q2.numpy(), qr, atol=2e-5)


@pytest.mark.parametrize("name", ["v3", "v3_no_qlora", "v3_yarn_mscale_diff", "v2"])
def test_mla_ref_and_router_match_hf_layer_io(name):
    m = oracle.build_hf(name, seed=2, init_std=0.1)
    toks = np.random.default_rng(0).integers(0, m.config.vocab_size, (2, 21))
    io = oracle.hf_layer_io(m, toks)
    sd = oracle.hf_state_dict_published(m)
    for li in (0, 1):
        w = {k: v for k, v in sd.items() if k.startswith(f"model.layers.{li}.self_attn.")}
        for absorb in (False, True):
            out = ref.mla_ref(io[li]["attn_in"], w, m.config, absorb=absorb)
            np.testing.assert_allclose(out, io[li]["attn_out"], rtol=0, atol=2e-5 * np.abs(out).max())
    r = io[1]
    bias = sd.get("model.layers.1.mlp.gate.e_score_correction_bias")
    c = m.config
    v3 = name.startswith("v3")
    wts, idx = ref.router_ref(r["mlp_in"].reshape(-1, c.hidden_size), sd["model.layers.1.mlp.gate.weight"], bias,
                              score_func="sigmoid" if v3 else "softmax", n_group=c.n_group, topk_group=c.topk_group,
                              top_k=c.num_experts_per_tok, norm_topk_prob=c.norm_topk_prob if v3 else False,
                              route_scale=c.routed_scaling_factor)
    np.testing.assert_array_equal(r["topk_idx"].reshape(idx.shape), idx)
    np.testing.assert_allclose(r["topk_weights"].reshape(wts.shape), wts, atol=1e-6)
    assert set(r) >= {"layer_in", "attn_in", "attn_out", "mlp_in", "mlp_out", "layer_out", "router_logits"}
    np.testing.assert_allclose(r["layer_in"] + r["attn_out"] + r["mlp_out"], r["layer_out"], atol=1e-5)


@pytest.mark.parametrize("name", ["v3", "v3_shared0_dense0", "v2_greedy"])
def test_grads_cover_every_published_name(name, tmp_path):
    m = oracle.build_hf(name, seed=1)
    toks = np.random.default_rng(0).integers(0, m.config.vocab_size, (2, 9))
    loss, grads = oracle.hf_loss_and_grads(m, toks)
    assert np.isfinite(loss) and abs(loss - np.log(m.config.vocab_size)) < 0.5
    oracle.save_hf(m, tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    sd = oracle.hf_state_dict_published(m)
    assert "model.layers.1.mlp.experts.5.gate_proj.weight" in sd and not any("gate_up_proj" in k for k in sd)
    trainable = {k for k in sd if not k.endswith("e_score_correction_bias")}
    assert set(grads) == trainable
    for k in trainable:
        assert grads[k].shape == sd[k].shape, k
    # our split (gate rows first) reproduces transformers' own save conversion value for value
    mine = oracle.internal_to_published(dict(m.state_dict()))
    for k, v in sd.items():
        np.testing.assert_array_equal(mine[k], v, err_msg=k)


def test_expert_grad_directional_derivative():
    m = oracle.build_hf("v3", seed=1, init_std=0.1).double()
    toks = np.random.default_rng(0).integers(0, 97, (2, 9))
    _, grads = oracle.hf_loss_and_grads(m, toks)
    ids = torch.as_tensor(toks)
    ex = m.model.layers[1].mlp.experts
    I = m.config.moe_intermediate_size
    e = int(np.argmax([np.abs(grads[f"model.layers.1.mlp.experts.{j}.up_proj.weight"]).sum() for j in range(6)]))
    d = torch.randn(I, m.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def loss_at(eps):
        with torch.no_grad():
            ex.gate_up_proj[e, I:] += eps * d
            lg = m(input_ids=ids).logits
            ex.gate_up_proj[e, I:] -= eps * d
        return torch.nn.functional.cross_entropy(lg[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1)).item()

    fd = (loss_at(1e-4) - loss_at(-1e-4)) / 2e-4
    an = float((grads[f"model.layers.1.mlp.experts.{e}.up_proj.weight"] * d.numpy()).sum())
    assert fd == pytest.approx(an, rel=1e-4, abs=1e-9)


def test_mtp_ref_shape_and_causality():
    cfg = oracle.make_config("v3")
    m = oracle.build_hf("v3", seed=0)
    toks = np.random.default_rng(0).integers(0, 97, (2, 11))
    h = oracle.hf_final_hidden(m, toks)
    w = ref.make_mtp_weights(cfg, seed=7, share_from=m)
    pre = f"model.layers.{cfg.num_hidden_layers}."
    assert w[pre + "eh_proj.weight"].shape == (72, 144)
    assert pre + "mlp.experts.5.down_proj.weight" in w and pre + "mlp.gate.e_score_correction_bias" in w
    layer = ref.build_mtp_layer(cfg, w)
    logits = ref.mtp_ref(cfg, w, h, toks, layer=layer)
    assert logits.shape == (2, 10, 97) and np.isfinite(logits).all()
    toks2 = toks.copy()
    toks2[:, -1] = (toks2[:, -1] + 1) % 97  # only position T-2 sees t_{T-1}
    logits2 = ref.mtp_ref(cfg, w, h, toks2, layer=layer)
    np.testing.assert_array_equal(logits2[:, :-1], logits[:, :-1])
    assert np.abs(logits2[:, -1] - logits[:, -1]).max() > 0


def test_repo_bench_configs_build_equal_transformers_and_jaxmoe_models():
    """bench/bench_configs.json (the repository's copy, always present) describes the same model
    to transformers, to jaxmoe and to the `bench-small` training run."""
    from jaxmoe.config import ModelConfig
    from jaxmoe.train.runs import get_run
    from jaxmoe.train.trainer import resolve_model_config

    data = json.loads(oracle.REPO_BENCH_CONFIGS.read_text())
    assert set(data["configs"]) == {"bench-tiny", "bench-small"}
    assert (data["batch"], data["seq"], data["dtype"]) == (8, 256, "float32")
    # not model fields: transformers' `dtype` is its weights' torch dtype (None here);
    # num_nextn_predict_layers defaults to 1 in DeepseekV3Config, which builds no MTP module;
    # jaxmoe reads the absent field as 0 (the model transformers runs)
    skip = {"dtype", "num_nextn_predict_layers"}
    for name, kw in data["configs"].items():
        hf = oracle.make_config({"arch": "v3", **kw})  # transformers DeepseekV3Config
        assert hf.model_type == "deepseek_v3"
        for k, v in kw.items():  # transformers keeps every field as written
            assert getattr(hf, k) == v, (name, k)
        mine = ModelConfig.from_hf_config(kw, source=f"{oracle.REPO_BENCH_CONFIGS}[{name}]")
        shared = [f.name for f in dataclasses.fields(ModelConfig)
                  if hasattr(hf, f.name) and f.name not in skip]
        assert len(shared) >= 25, shared  # the whole architecture, not a handful of fields
        for f in shared:
            assert getattr(mine, f) == getattr(hf, f), (name, f, getattr(mine, f), getattr(hf, f))
        assert (mine.rope_type, mine.rope_theta) == (hf.rope_parameters["rope_type"],
                                                     hf.rope_parameters["rope_theta"]), name
        assert (mine.scoring_func, mine.topk_method) == ("sigmoid", "noaux_tc")  # V3's router
        assert mine.num_nextn_predict_layers == 0
        assert oracle.CONFIGS[name]["hidden_size"] == kw["hidden_size"]  # loaded by the oracle
    assert oracle.make_config("bench-small").n_routed_experts == 32
    # the `bench-small` run (jaxmoe/train/runs.py spells the shape out) trains this model
    small = ModelConfig.from_hf_config(data["configs"]["bench-small"])
    assert resolve_model_config(get_run("bench-small")) == small


def test_oracle_bench_configs_are_the_repo_copy():
    """The file the oracle loads: $JAXMOE_BENCH_CONFIGS, else ../shared/bench/bench_configs.json
    when present, which must then be byte-identical to the repository's copy (no drift), else
    the repository's copy itself. Either way every loaded config is the repository copy's."""
    repo, shared = oracle.REPO_BENCH_CONFIGS, oracle.SHARED_BENCH_CONFIGS
    env = os.environ.get("JAXMOE_BENCH_CONFIGS")
    used = oracle.bench_configs_path()
    assert used == (Path(env) if env else shared if shared.is_file() else repo)
    assert used.read_bytes() == repo.read_bytes(), f"{used} and {repo} differ"
    configs = json.loads(repo.read_text())["configs"]
    for name, kw in configs.items():
        assert oracle.CONFIGS[name] == {"arch": "v3", **kw}, name
