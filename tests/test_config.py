"""ModelConfig, presets, parameter counts and the HF / official config mappings (dsv3-spec §1, §3.1, §4, §5.1, §7)."""

import dataclasses
import json
import math
import re

import jax
import numpy as np
import pytest
from flax import nnx

import jaxmoe
from jaxmoe import ConfigError, ModelConfig, hf_mapping
from jaxmoe.layers.params import RouterBias
from jaxmoe.layers.rope import attention_factor

# The deepseek-ai/DeepSeek-V3 config.json, field for field as listed in dsv3-spec §1.3.
V3_CONFIG_JSON = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                 "AutoModel": "modeling_deepseek.DeepseekV3Model",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_nextn_predict_layers": 1, "num_attention_heads": 128,
    "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256, "num_experts_per_tok": 8,
    "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
    "routed_scaling_factor": 2.5, "first_k_dense_replace": 3, "moe_layer_freq": 1, "ep_size": 1,
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "hidden_act": "silu", "rms_norm_eps": 1e-6, "max_position_embeddings": 163840,
    "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": False, "bos_token_id": 0,
    "eos_token_id": 1, "initializer_range": 0.02, "pretraining_tp": 1, "torch_dtype": "bfloat16",
    "use_cache": True,
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128]},
}

# Official inference/configs/config_{16B,236B,671B}.json (ModelArgs names, spec §1.2; unset = §1.1 defaults).
_OFF_COMMON = dict(kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)
OFFICIAL_16B = dict(vocab_size=102400, dim=2048, inter_dim=10944, moe_inter_dim=1408, n_layers=27,
                    n_dense_layers=1, n_heads=16, n_routed_experts=64, n_shared_experts=2, n_activated_experts=6,
                    route_scale=1.0, q_lora_rank=0, mscale=0.707, dtype="bf16", **_OFF_COMMON)
OFFICIAL_236B = dict(vocab_size=102400, dim=5120, inter_dim=12288, moe_inter_dim=1536, n_layers=60,
                     n_dense_layers=1, n_heads=128, n_routed_experts=160, n_shared_experts=2,
                     n_activated_experts=6, n_expert_groups=8, n_limited_groups=3, route_scale=16.0,
                     q_lora_rank=1536, dtype="bf16", **_OFF_COMMON)
OFFICIAL_671B = dict(vocab_size=129280, dim=7168, inter_dim=18432, moe_inter_dim=2048, n_layers=61,
                     n_dense_layers=3, n_heads=128, n_routed_experts=256, n_shared_experts=1,
                     n_activated_experts=8, n_expert_groups=8, n_limited_groups=4, route_scale=2.5,
                     score_func="sigmoid", q_lora_rank=1536, dtype="fp8", **_OFF_COMMON)


def _diff(a: ModelConfig, b: ModelConfig) -> dict:
    return {f.name: (getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(ModelConfig)
            if getattr(a, f.name) != getattr(b, f.name)}


# ------------------------------------------------------------------------------------------------ presets
def test_presets_build():
    v3, v2, lite, t = (jaxmoe.deepseek_v3_671b(), jaxmoe.deepseek_v2(), jaxmoe.deepseek_v2_lite(),
                       jaxmoe.tiny())
    for c in (v3, v2, lite, t):
        assert isinstance(c, ModelConfig)
    # spec §1.2 / §10 table
    assert (v3.hidden_size, v3.num_hidden_layers, v3.first_k_dense_replace, v3.num_nextn_predict_layers) == (
        7168, 61, 3, 1)
    assert (v3.topk_method, v3.scoring_func, v3.n_group, v3.topk_group, v3.num_experts_per_tok) == (
        "noaux_tc", "sigmoid", 8, 4, 8)
    assert v3.norm_topk_prob and v3.routed_scaling_factor == 2.5 and v3.has_router_bias
    assert (v2.hidden_size, v2.n_routed_experts, v2.topk_method, v2.n_group, v2.topk_group) == (
        5120, 160, "group_limited_greedy", 8, 3)
    assert (v2.routed_scaling_factor, v2.norm_topk_prob, v2.mscale_all_dim, v2.has_router_bias) == (
        16.0, False, 0.707, False)
    assert (lite.q_lora_rank, lite.topk_method, lite.routing_groups, lite.n_routed_experts) == (None, "greedy", 1, 64)
    assert lite.shared_intermediate_size == 2816 and v2.shared_intermediate_size == 3072
    for name in jaxmoe.PRESETS:
        assert jaxmoe.get_preset(name) == jaxmoe.PRESETS[name]()
    assert jaxmoe.get_preset("deepseek-v3-671b") == v3
    assert jaxmoe.get_preset("tiny", num_hidden_layers=5).num_hidden_layers == 5


def test_unknown_preset_names_it():
    with pytest.raises(ConfigError, match="deepseek_v9_huge"):
        jaxmoe.get_preset("deepseek_v9_huge")


# -------------------------------------------------------------------------------------- parameter counts
def spec_tensor_shapes(c: ModelConfig):
    """(published name, shape) of every non-scale tensor, from the shapes in spec §3.1, §4, §5.1 and §7."""
    D, V, H, r, dr = c.hidden_size, c.vocab_size, c.num_attention_heads, c.kv_lora_rank, c.qk_rope_head_dim
    dqk, dnv = c.qk_nope_head_dim + dr, c.qk_nope_head_dim + c.v_head_dim

    def layer(p, moe):
        out = [("input_layernorm.weight", (D,)), ("post_attention_layernorm.weight", (D,))]
        if c.q_lora_rank:
            rq = c.q_lora_rank
            out += [("self_attn.q_a_proj.weight", (rq, D)), ("self_attn.q_a_layernorm.weight", (rq,)),
                    ("self_attn.q_b_proj.weight", (H * dqk, rq))]
        else:
            out += [("self_attn.q_proj.weight", (H * dqk, D))]
        out += [("self_attn.kv_a_proj_with_mqa.weight", (r + dr, D)), ("self_attn.kv_a_layernorm.weight", (r,)),
                ("self_attn.kv_b_proj.weight", (H * dnv, r)), ("self_attn.o_proj.weight", (D, H * c.v_head_dim))]
        if not moe:
            I = c.intermediate_size
            out += [("mlp.gate_proj.weight", (I, D)), ("mlp.up_proj.weight", (I, D)), ("mlp.down_proj.weight", (D, I))]
        else:
            E, F, S = c.n_routed_experts, c.moe_intermediate_size, c.n_shared_experts * c.moe_intermediate_size
            out += [("mlp.gate.weight", (E, D))]
            if c.topk_method == "noaux_tc":
                out += [("mlp.gate.e_score_correction_bias", (E,))]
            for e in range(E):
                out += [(f"mlp.experts.{e}.gate_proj.weight", (F, D)), (f"mlp.experts.{e}.up_proj.weight", (F, D)),
                        (f"mlp.experts.{e}.down_proj.weight", (D, F))]
            if S:
                out += [("mlp.shared_experts.gate_proj.weight", (S, D)), ("mlp.shared_experts.up_proj.weight", (S, D)),
                        ("mlp.shared_experts.down_proj.weight", (D, S))]
        return [(p + n, s) for n, s in out]

    shapes = [("model.embed_tokens.weight", (V, D)), ("model.norm.weight", (D,)), ("lm_head.weight", (V, D))]
    for L in range(c.num_hidden_layers):
        shapes += layer(f"model.layers.{L}.", L >= c.first_k_dense_replace)
    for i in range(c.num_nextn_predict_layers):
        p = f"model.layers.{c.num_hidden_layers + i}."
        shapes += [(p + "embed_tokens.weight", (V, D)), (p + "enorm.weight", (D,)), (p + "hnorm.weight", (D,)),
                   (p + "eh_proj.weight", (D, 2 * D)), (p + "shared_head.norm.weight", (D,)),
                   (p + "shared_head.head.weight", (V, D))]
        shapes += layer(p, True)
    return shapes


def spec_param_count(c: ModelConfig) -> int:
    return sum(math.prod(s) for _, s in spec_tensor_shapes(c))


def model_param_count(c: ModelConfig) -> int:
    """nnx.Param leaves plus the RouterBias (e_score_correction_bias), from an allocation-free eval_shape."""
    m = nnx.eval_shape(lambda: jaxmoe.DeepseekV3(c, rngs=nnx.Rngs(0)))
    n = lambda st: sum(math.prod(x.shape) for x in jax.tree.leaves(st))  # noqa: E731
    params, bias, everything = nnx.state(m, nnx.Param), nnx.state(m, RouterBias), nnx.state(m)
    # nothing else lives in the state, so Param + RouterBias is every stored number
    assert n(everything) == n(params) + n(bias)
    assert (n(bias) > 0) == c.has_router_bias
    return n(params) + n(bias)


def test_router_bias_is_not_a_trainable_param():
    assert issubclass(RouterBias, nnx.Variable) and not issubclass(RouterBias, nnx.Param)


def test_param_count_671b():
    v3 = jaxmoe.deepseek_v3_671b()
    main = v3.replace(num_nextn_predict_layers=0)
    # spec §7: "684,489,845,504 total, 671,026,419,200 main" (e_score_correction_bias included: 59 x 256)
    assert spec_param_count(main) == 671_026_419_200
    assert spec_param_count(v3) == 684_489_845_504
    assert spec_param_count(v3) - spec_param_count(main) == 13_463_426_304  # layer 61 (§7)
    assert model_param_count(main) == 671_026_419_200
    assert model_param_count(v3) == 684_489_845_504


def test_published_tensor_names_671b():
    """The mapping enumerates exactly the spec §7 tensors: 91,991 index entries minus 45,808 FP8 scales."""
    v3 = jaxmoe.deepseek_v3_671b()
    spec_names = [n for n, _ in spec_tensor_shapes(v3)]
    ours = [e.hf_name for e in hf_mapping.entries(v3)]
    assert len(spec_names) == 91_991 - 45_808
    assert len(ours) == len(set(ours)) and set(ours) == set(spec_names)
    # spec §6: every linear inside decoder layers 0..61 is FP8 (router gate, MTP eh_proj/embed/head are not)
    mtp_extra = ("embed_tokens.weight", "eh_proj.weight", "shared_head.head.weight")
    spec_fp8 = {n for n, s in spec_tensor_shapes(v3) if n.startswith("model.layers.") and len(s) == 2
                and not n.endswith("mlp.gate.weight") and not n.endswith(mtp_extra)}
    assert len(spec_fp8) == 45_808
    ours_fp8 = {e.hf_name for e in hf_mapping.entries(v3) if e.fp8_eligible}
    assert sorted(spec_fp8 - ours_fp8)[:4] == [] and sorted(ours_fp8 - spec_fp8)[:4] == []


@pytest.mark.parametrize("preset,billions", [("deepseek_v2_lite", 15.71), ("deepseek_v2", 235.74)])
def test_param_count_v2(preset, billions):
    c = jaxmoe.get_preset(preset)
    n = spec_param_count(c)
    assert round(n / 1e9, 2) == billions  # spec §1.2
    assert model_param_count(c) == n


# ------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kw,field", [
    (dict(n_routed_experts=9), "n_routed_experts"),           # 9 experts, n_group 2
    (dict(n_group=2, topk_group=3), "topk_group"),
    (dict(num_experts_per_tok=5), "num_experts_per_tok"),     # kept: 1 group of 4 experts
    (dict(n_routed_experts=12, n_group=4, topk_group=2, num_experts_per_tok=7), "num_experts_per_tok"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(topk_method="top2"), "topk_method"),
    (dict(scoring_func="relu"), "scoring_func"),
    (dict(first_k_dense_replace=4), "first_k_dense_replace"),  # tiny has 3 layers
])
def test_invalid_combinations_name_the_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        jaxmoe.tiny(**kw)


def test_valid_edge_combinations():
    jaxmoe.tiny(num_experts_per_tok=4)  # exactly the experts of the one kept group
    jaxmoe.tiny(first_k_dense_replace=3, num_nextn_predict_layers=0)  # all dense
    # greedy ignores n_group/topk_group: all 8 experts are selectable
    jaxmoe.tiny(topk_method="greedy", scoring_func="softmax", num_experts_per_tok=6)


# ------------------------------------------------------------------------------------------- HF config
def test_from_hf_config_real_v3_json_is_the_671b_preset():
    c = ModelConfig.from_hf_config(V3_CONFIG_JSON)
    d = _diff(c, jaxmoe.deepseek_v3_671b())
    # initializer_range: the json carries the HF default 0.02; the preset uses [TR]'s 0.006 (spec §1.3 note).
    assert c.initializer_range == 0.02
    d.pop("initializer_range")
    d.pop("num_nextn_predict_layers", None)
    assert d == {}
    assert c.num_nextn_predict_layers == 1


def test_from_hf_config_file_and_folder(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(V3_CONFIG_JSON))
    from_dict = ModelConfig.from_hf_config(V3_CONFIG_JSON)
    assert ModelConfig.from_hf_config(str(p)) == from_dict
    assert ModelConfig.from_hf_config(p) == from_dict
    assert ModelConfig.from_hf_config(tmp_path) == from_dict
    assert ModelConfig.from_hf_config(tmp_path, num_hidden_layers=4).num_hidden_layers == 4


@pytest.mark.parametrize("field", ["hidden_size", "vocab_size", "num_attention_heads", "qk_rope_head_dim",
                                   "kv_lora_rank"])
def test_from_hf_config_missing_field(field):
    d = {k: v for k, v in V3_CONFIG_JSON.items() if k != field}
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_hf_config(d)


def test_from_hf_config_invalid_values_name_the_field():
    with pytest.raises(ConfigError, match="topk_group"):
        ModelConfig.from_hf_config({**V3_CONFIG_JSON, "topk_group": 9})
    with pytest.raises(ConfigError, match="n_routed_experts"):
        ModelConfig.from_hf_config({**V3_CONFIG_JSON, "n_group": 3})


@pytest.mark.parametrize("preset", sorted(jaxmoe.PRESETS))
def test_to_hf_config_round_trip(preset):
    c = jaxmoe.get_preset(preset)
    d = c.to_hf_config()
    assert ModelConfig.from_hf_config(d) == c
    assert ModelConfig.from_hf_config(json.loads(json.dumps(d))) == c  # survives a json file


@pytest.mark.parametrize("preset", sorted(jaxmoe.PRESETS))
def test_to_hf_config_loads_in_transformers(preset):
    from transformers import DeepseekV2Config, DeepseekV3Config

    c = jaxmoe.get_preset(preset)
    d = c.to_hf_config()
    cls = DeepseekV3Config if d["model_type"] == "deepseek_v3" else DeepseekV2Config
    assert cls is (DeepseekV3Config if c.topk_method == "noaux_tc" else DeepseekV2Config)
    hf = cls(**d)
    for k in ("hidden_size", "num_hidden_layers", "n_routed_experts", "num_experts_per_tok", "n_group",
              "topk_group", "q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "first_k_dense_replace",
              "routed_scaling_factor", "norm_topk_prob", "rms_norm_eps"):
        assert getattr(hf, k) == getattr(c, k), k
    assert hf.rope_parameters["rope_type"] == c.rope_type
    if c.rope_type == "yarn":
        assert hf.rope_parameters["factor"] == c.rope_factor
        assert hf.rope_parameters["mscale_all_dim"] == c.mscale_all_dim
    assert ModelConfig.from_hf_config(hf.to_dict()) == c  # and back through transformers' own dict


# ---------------------------------------------------------------------------------- official ModelArgs
def test_from_official_args_671b():
    c = ModelConfig.from_official_args(OFFICIAL_671B)
    assert (c.topk_method, c.scoring_func, c.norm_topk_prob, c.has_router_bias) == ("noaux_tc", "sigmoid", True, True)
    assert (c.n_group, c.topk_group, c.num_experts_per_tok, c.routed_scaling_factor) == (8, 4, 8, 2.5)
    assert attention_factor(c) == 1.0  # official code has no cos/sin factor
    assert _diff(c, jaxmoe.deepseek_v3_671b(num_nextn_predict_layers=0)) == {}


def test_from_official_args_16b():
    c = ModelConfig.from_official_args(OFFICIAL_16B)
    assert (c.topk_method, c.scoring_func, c.norm_topk_prob, c.has_router_bias) == ("greedy", "softmax", False, False)
    assert (c.routing_groups, c.routing_topk_group, c.num_experts_per_tok, c.routed_scaling_factor) == (1, 1, 6, 1.0)
    assert c.q_lora_rank is None  # official 0 = no query compression
    assert c.mscale_all_dim == 0.707 and attention_factor(c) == 1.0
    d = _diff(c, jaxmoe.deepseek_v2_lite())
    assert set(d) <= {"bos_token_id", "eos_token_id"}, d  # the official args carry no token ids


def test_from_official_args_236b():
    c = ModelConfig.from_official_args(OFFICIAL_236B)
    assert (c.topk_method, c.scoring_func, c.norm_topk_prob) == ("group_limited_greedy", "softmax", False)
    assert (c.n_group, c.topk_group, c.num_experts_per_tok, c.routed_scaling_factor) == (8, 3, 6, 16.0)
    d = _diff(c, jaxmoe.deepseek_v2())
    # spec §1.2 uncertainty: the official 236B file leaves mscale at 1.0; the preset follows HF's 0.707
    assert set(d) <= {"bos_token_id", "eos_token_id", "mscale", "mscale_all_dim"}, d
    assert c.mscale_all_dim == 1.0


# ------------------------------------------------------------------------------------ value types
@pytest.mark.parametrize("key,value,expected", [
    ("hidden_size", "sixty-four", "an integer"),
    ("moe_intermediate_size", 32.0, "an integer"),        # integral floats too: HF writes ints
    ("num_hidden_layers", 2.5, "an integer"),
    ("vocab_size", True, "an integer"),                   # a bool is not a width
    ("n_group", "8", "an integer"),
    ("num_nextn_predict_layers", 1.0, "an integer"),
    ("routed_scaling_factor", "2.5", "a number"),
    ("rms_norm_eps", [1e-6], "a number"),
    ("norm_topk_prob", "false", "true or false"),
    ("tie_word_embeddings", 0, "true or false"),
    ("topk_method", 3, "a string"),
    ("q_lora_rank", 1536.0, "an integer"),
])
def test_from_hf_config_wrong_value_type_names_field_and_file(tmp_path, key, value, expected):
    (tmp_path / "config.json").write_text(json.dumps({**V3_CONFIG_JSON, key: value}))
    msg = rf"config\.json: {key} = {re.escape(repr(value))}: expected {expected}$"
    with pytest.raises(ConfigError, match=msg):
        ModelConfig.from_hf_config(tmp_path)
    with pytest.raises(ConfigError, match=rf"^cfg\.json: {key} = "):  # a dict, named by `source`
        ModelConfig.from_hf_config({**V3_CONFIG_JSON, key: value}, source="cfg.json")


@pytest.mark.parametrize("rope,msg", [
    ("yarn", r"rope_scaling = 'yarn': expected an object"),
    ({**V3_CONFIG_JSON["rope_scaling"], "factor": "40"}, r"rope_scaling\.factor = '40': expected a number"),
    ({**V3_CONFIG_JSON["rope_scaling"], "original_max_position_embeddings": 4096.0},
     r"rope_scaling\.original_max_position_embeddings = 4096\.0: expected an integer"),
    ({**V3_CONFIG_JSON["rope_scaling"], "original_max_position_embeddings": 0},
     r"original_max_position_embeddings = 0: must be positive"),
    ({**V3_CONFIG_JSON["rope_scaling"], "type": 1}, r"rope_scaling\.type = 1: expected a string"),
])
def test_from_hf_config_wrong_rope_types(rope, msg):
    with pytest.raises(ConfigError, match=msg):
        ModelConfig.from_hf_config({**V3_CONFIG_JSON, "rope_scaling": rope})


def test_from_hf_config_accepts_numbers_for_floats_and_null_for_optionals():
    c = ModelConfig.from_hf_config({**V3_CONFIG_JSON, "routed_scaling_factor": 3, "rope_theta": 5e4,
                                    "bos_token_id": None, "q_lora_rank": None, "n_group": None,
                                    "topk_group": None, "num_experts_per_tok": 2})
    assert (c.routed_scaling_factor, c.rope_theta, c.q_lora_rank, c.n_group) == (3, 5e4, None, 1)
    assert c.bos_token_id == 0  # null falls back to the default, as before


@pytest.mark.parametrize("text", ['{"hidden_size": 64,', "[1, 2]", "\udcff"])
def test_from_hf_config_malformed_json_names_file(tmp_path, text):
    (tmp_path / "config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ConfigError, match=r"config\.json: (not valid JSON|expected a JSON object)"):
        ModelConfig.from_hf_config(tmp_path)


@pytest.mark.parametrize("kw,msg", [
    (dict(hidden_size=32.0), "ModelConfig.hidden_size=32.0: expected an integer"),
    (dict(num_attention_heads="4"), "ModelConfig.num_attention_heads='4': expected an integer"),
    (dict(q_lora_rank=1.5), "ModelConfig.q_lora_rank=1.5: expected an integer or None"),
    (dict(rope_theta="1e4"), "ModelConfig.rope_theta='1e4': expected a number"),
    (dict(norm_topk_prob=1), "ModelConfig.norm_topk_prob=1: expected true or false"),
    (dict(moe_impl=None), "ModelConfig.moe_impl=None: expected a string"),
])
def test_model_config_checks_field_types(kw, msg):
    with pytest.raises(ConfigError, match=re.escape(msg)):
        jaxmoe.tiny(**kw)


def test_model_config_accepts_numpy_scalars_and_ints_for_floats():
    c = jaxmoe.tiny(hidden_size=np.int64(48), routed_scaling_factor=2, rope_theta=np.float32(1e4),
                    norm_topk_prob=np.bool_(False))
    assert (c.hidden_size, c.routed_scaling_factor, c.norm_topk_prob) == (48, 2, False)
