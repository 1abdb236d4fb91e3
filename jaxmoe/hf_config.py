"""`ModelConfig` <-> the Hugging Face `config.json` and the official DeepSeek `ModelArgs`.

Reading checks every raw JSON value against the field's declared type before any conversion
(so `"n_group": 8.7` or `"norm_topk_prob": "false"` are errors, not silently 8 / True) and maps
the V2/V3 routing and rope conventions onto our flat fields; every problem names the file.
`ModelConfig.from_hf_config`, `.to_hf_config` and `.from_official_args` are the entry points.
"""

from __future__ import annotations

from typing import Any, Mapping

from jaxmoe.config import OFFICIAL_NAMES, ConfigError, ModelConfig, field_kinds, type_problem


def from_hf_dict(d: dict[str, Any], where: str, overrides: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a parsed config.json `d` (`where` names it in errors)."""
    kinds = field_kinds()

    def get(src: Mapping[str, Any], key: str, kind: str, default: Any = None,
            prefix: str = "") -> Any:
        """src[key] checked against `kind` (null or absent: `default`)."""
        v = src.get(key)
        if v is None:
            return default
        bad = type_problem(v, kind, optional=False)
        if bad:
            raise ConfigError(f"{where}: {prefix}{key} = {v!r}: {bad}")
        return v

    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
    missing = [k for k in required if d.get(k) is None]
    if missing:
        raise ConfigError(f"{where}: missing required field(s) {missing}")
    model_type = get(d, "model_type", "str", "deepseek_v3")
    kw: dict[str, Any] = {}
    direct = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
              "num_hidden_layers", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
              "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
              "n_shared_experts", "num_experts_per_tok", "routed_scaling_factor",
              "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
              "initializer_range", "bos_token_id", "eos_token_id", "first_k_dense_replace")
    for k in direct:
        v = get(d, k, kinds[k][0])
        if v is not None:
            kw[k] = v
    if not kw.get("q_lora_rank"):
        kw["q_lora_rank"] = None  # official code uses 0 for "no query compression"
    kw["num_nextn_predict_layers"] = get(d, "num_nextn_predict_layers", "int", 0)
    kv_heads = get(d, "num_key_value_heads", "int")
    if kv_heads not in (None, d["num_attention_heads"]):
        raise ConfigError(f"{where}: num_key_value_heads={kv_heads} must equal "
                          f"num_attention_heads={d['num_attention_heads']} (MLA has no GQA)")
    if d.get("moe_layer_freq", 1) != 1:
        raise ConfigError(f"{where}: moe_layer_freq={d['moe_layer_freq']} unsupported (only 1)")
    if d.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where}: hidden_act={d['hidden_act']!r} unsupported (only silu)")
    if get(d, "attention_bias", "bool"):
        raise ConfigError(f"{where}: attention_bias=true unsupported (DeepSeek has none)")
    if get(d, "rope_interleave", "bool") is False:
        raise ConfigError(f"{where}: rope_interleave=false means permuted rope weights; "
                          "jaxmoe expects the published interleaved layout")
    # Routing: V3 is sigmoid + noaux_tc; V2 uses softmax with topk_method greedy/group_limited.
    v3 = model_type == "deepseek_v3"
    kw["scoring_func"] = get(d, "scoring_func", "str", "sigmoid" if v3 else "softmax")
    kw["topk_method"] = get(d, "topk_method", "str", "noaux_tc" if v3 else "greedy")
    if not v3 and not kw["topk_method"]:
        kw["topk_method"] = "greedy"
    if kw["topk_method"] == "gready":  # historical misspelling in V2 remote code
        kw["topk_method"] = "greedy"
    # (an explicit null reads as false, as transformers' `if norm_topk_prob` does)
    kw["norm_topk_prob"] = get(d, "norm_topk_prob", "bool", v3 and "norm_topk_prob" not in d)
    kw["n_group"] = get(d, "n_group", "int") or 1
    kw["topk_group"] = get(d, "topk_group", "int") or 1
    # Rope: transformers 5 writes rope_parameters (with rope_theta inside); older configs
    # rope_scaling + top-level rope_theta.
    rkey = "rope_parameters" if d.get("rope_parameters") else "rope_scaling"
    rp = d.get(rkey) or {}
    if not isinstance(rp, Mapping):
        raise ConfigError(f"{where}: {rkey} = {rp!r}: expected an object")
    pre = f"{rkey}."
    theta = get(rp, "rope_theta", "float", None, pre)
    kw["rope_theta"] = float(get(d, "rope_theta", "float", 10000.0) if theta is None else theta)
    rtype = get(rp, "rope_type", "str", None, pre) or get(rp, "type", "str", "default", pre)
    if rtype not in ("default", "yarn"):
        raise ConfigError(f"{where}: rope type {rtype!r} unsupported (default or yarn)")
    kw["rope_type"] = rtype
    if rtype == "yarn":
        omp = get(rp, "original_max_position_embeddings", "int", None, pre)
        if omp is None:
            raise ConfigError(f"{where}: yarn rope needs original_max_position_embeddings")
        if omp <= 0:
            raise ConfigError(f"{where}: {pre}original_max_position_embeddings = {omp}: "
                              "must be positive")
        factor = get(rp, "factor", "float", None, pre)
        if factor is None:  # transformers derives it from the two lengths
            factor = kw.get("max_position_embeddings", ModelConfig.max_position_embeddings) / omp
        kw.update(rope_factor=float(factor), original_max_position_embeddings=omp,
                  beta_fast=float(get(rp, "beta_fast", "float", None, pre) or 32),
                  beta_slow=float(get(rp, "beta_slow", "float", None, pre) or 1),
                  mscale=float(get(rp, "mscale", "float", None, pre) or 0),
                  mscale_all_dim=float(get(rp, "mscale_all_dim", "float", None, pre) or 0),
                  rope_truncate=get(rp, "truncate", "bool", "truncate" not in rp, pre))
        if rp.get("attention_factor") is not None:
            raise ConfigError(f"{where}: rope attention_factor override unsupported")
    kw.update(overrides)
    try:
        return ModelConfig(**kw)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def to_hf_dict(self: ModelConfig) -> dict[str, Any]:
    """A `config.json` dict that transformers' DeepseekV3Config/V2Config reads back."""
    v3 = self.topk_method == "noaux_tc"
    d: dict[str, Any] = {
        "architectures": ["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v3" if v3 else "deepseek_v2",
        "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "moe_intermediate_size": self.moe_intermediate_size,
        "num_hidden_layers": self.num_hidden_layers,
        "num_nextn_predict_layers": self.num_nextn_predict_layers,
        "num_attention_heads": self.num_attention_heads,
        "num_key_value_heads": self.num_attention_heads,
        "n_shared_experts": self.n_shared_experts, "n_routed_experts": self.n_routed_experts,
        "num_experts_per_tok": self.num_experts_per_tok, "n_group": self.n_group,
        "topk_group": self.topk_group, "topk_method": self.topk_method,
        "scoring_func": self.scoring_func, "norm_topk_prob": self.norm_topk_prob,
        "routed_scaling_factor": self.routed_scaling_factor,
        "first_k_dense_replace": self.first_k_dense_replace, "moe_layer_freq": 1,
        "q_lora_rank": self.q_lora_rank, "kv_lora_rank": self.kv_lora_rank,
        "qk_nope_head_dim": self.qk_nope_head_dim, "qk_rope_head_dim": self.qk_rope_head_dim,
        "v_head_dim": self.v_head_dim, "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps,
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": False,
        "initializer_range": self.initializer_range, "bos_token_id": self.bos_token_id,
        "eos_token_id": self.eos_token_id, "rope_interleave": True,
    }
    rp: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
    if self.rope_type == "yarn":
        rp.update(factor=self.rope_factor,
                  original_max_position_embeddings=self.original_max_position_embeddings,
                  beta_fast=self.beta_fast, beta_slow=self.beta_slow, mscale=self.mscale,
                  mscale_all_dim=self.mscale_all_dim)
    d["rope_parameters"] = rp
    return d


def from_official_args(args: Mapping[str, Any], **overrides) -> ModelConfig:
    """Build from the official `inference/configs/*.json` (ModelArgs names)."""
    kw: dict[str, Any] = {}
    for k, v in args.items():
        if k in OFFICIAL_NAMES:
            kw[OFFICIAL_NAMES[k]] = v
    if not kw.get("q_lora_rank"):
        kw["q_lora_rank"] = None
    sig = args.get("score_func", "softmax") == "sigmoid"
    groups = int(args.get("n_expert_groups", 1))
    kw.setdefault("scoring_func", "softmax")
    # the official Gate has its selection bias exactly when dim == 7168, whatever the scoring
    # function (dsv3-spec §4.2, §9.5); with it groups rank by their top-2 sum, else by their max
    biased = int(args.get("dim", 0)) == 7168
    kw["topk_method"] = "noaux_tc" if biased else ("group_limited_greedy" if groups > 1 else "greedy")
    kw["norm_topk_prob"] = sig  # official renormalises iff sigmoid scoring
    kw.setdefault("n_group", groups)
    kw.setdefault("topk_group", int(args.get("n_limited_groups", 1)))
    kw["mscale"] = kw.get("mscale_all_dim", 1.0)
    kw.update(overrides)
    return ModelConfig(**kw)
