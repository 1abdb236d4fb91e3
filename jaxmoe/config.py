"""`ModelConfig`: the one frozen description of a DeepSeek-V2/V3-family architecture.

Field names follow the Hugging Face `config.json` (what users hold); `OFFICIAL_NAMES` maps the
official DeepSeek `ModelArgs` names onto them (dsv3-spec.md §1.3). Presets reproduce the
published configs. Every combination that cannot run raises `ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import os
from typing import Any, Mapping

import numpy as np

# Official `inference/model.py` ModelArgs name -> our (HF) field name. Rope fields live in
# `rope_scaling` on the HF side; we keep them flat.
OFFICIAL_NAMES: dict[str, str] = {
    "vocab_size": "vocab_size",
    "dim": "hidden_size",
    "inter_dim": "intermediate_size",
    "moe_inter_dim": "moe_intermediate_size",
    "n_layers": "num_hidden_layers",
    "n_dense_layers": "first_k_dense_replace",
    "n_heads": "num_attention_heads",
    "n_routed_experts": "n_routed_experts",
    "n_shared_experts": "n_shared_experts",
    "n_activated_experts": "num_experts_per_tok",
    "n_expert_groups": "n_group",
    "n_limited_groups": "topk_group",
    "score_func": "scoring_func",
    "route_scale": "routed_scaling_factor",
    "q_lora_rank": "q_lora_rank",
    "kv_lora_rank": "kv_lora_rank",
    "qk_nope_head_dim": "qk_nope_head_dim",
    "qk_rope_head_dim": "qk_rope_head_dim",
    "v_head_dim": "v_head_dim",
    "rope_theta": "rope_theta",
    "original_seq_len": "original_max_position_embeddings",
    "rope_factor": "rope_factor",
    "beta_fast": "beta_fast",
    "beta_slow": "beta_slow",
    "mscale": "mscale_all_dim",
    "max_seq_len": "max_position_embeddings",
}

TOPK_METHODS = ("noaux_tc", "group_limited_greedy", "greedy")
DTYPES = ("float32", "bfloat16", "float16")
# "auto" picks one per backend (`kernels/dispatch.default_impl`); the rest are `dispatch.IMPLS`
# (config stays a leaf that imports no jax; tests/test_dispatch.py checks the two agree)
MOE_IMPLS = ("auto", "segment", "ragged_dot", "dense", "pallas")


class ConfigError(ValueError):
    """An invalid or unsupported architecture setting; the message names the field."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """DeepSeek-V2/V3 architecture plus the dtype policy.

    Dtype policy: parameters are stored in `param_dtype`, matmuls run in `dtype`; RMSNorm, the
    router (logits, scores, top-k weights), attention softmax and the loss always run in float32.
    """

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    num_nextn_predict_layers: int = 0
    num_attention_heads: int = 128
    # MLA
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # MoE
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    # Norms and rotary
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_type: str = "yarn"  # "default" (plain RoPE) or "yarn"
    rope_factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    rope_truncate: bool = True
    tie_word_embeddings: bool = False
    initializer_range: float = 0.006
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    # Dtype policy
    param_dtype: str = "float32"
    dtype: str = "float32"
    # Runtime: the routed-expert dispatch ("auto" picks per backend; see kernels/dispatch.py), and the
    # optional expert capacity (None = dropless; else each expert keeps its first
    # ceil(factor * tokens * K / E) (token, expert) pairs and the MoE aux reports the dropped count)
    moe_impl: str = "auto"
    moe_capacity_factor: float | None = None
    # Dynamic top-p routing (off by default, so published weights route exactly as trained): per
    # token keep the smallest set of the router's top `router_max_k` experts whose renormalised
    # scores reach `router_top_p`, at least `router_min_k` (None: 2, or max k when smaller);
    # router_max_k None = num_experts_per_tok. Dispatch runs a static router_max_k slots per token.
    router_top_p: float | None = None
    router_min_k: int | None = None
    router_max_k: int | None = None

    def __post_init__(self):
        self.validate()

    # ----------------------------------------------------------------------------------- checks
    def validate(self) -> None:
        def need(cond: bool, field: str, msg: str):
            if not cond:
                raise ConfigError(f"ModelConfig.{field}={getattr(self, field)!r}: {msg}")

        # Types first: a string or a float width would otherwise fail far away (a comparison
        # TypeError below, or a non-integer shape deep inside JAX).
        for f, (kind, optional) in field_kinds().items():
            bad = type_problem(getattr(self, f), kind, optional)
            need(bad is None, f, bad or "")
        for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            need(getattr(self, f) > 0, f, "must be positive")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
             f"must be in [0, num_hidden_layers={self.num_hidden_layers}]")
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0")
        need(self.q_lora_rank is None or self.q_lora_rank > 0, "q_lora_rank",
             "must be None (no query compression) or positive")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "rotary pairs need an even size")
        need(self.topk_method in TOPK_METHODS, "topk_method", f"must be one of {TOPK_METHODS}")
        need(self.scoring_func in ("sigmoid", "softmax"), "scoring_func",
             "must be 'sigmoid' or 'softmax'")
        need(self.rope_type in ("default", "yarn"), "rope_type", "must be 'default' or 'yarn'")
        need(self.param_dtype in DTYPES, "param_dtype", f"must be one of {DTYPES}")
        need(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}")
        need(self.moe_impl in MOE_IMPLS, "moe_impl", f"must be one of {MOE_IMPLS}")
        need(self.moe_capacity_factor is None or self.moe_capacity_factor > 0, "moe_capacity_factor",
             "must be None (dropless) or positive")
        need(self.router_top_p is None or 0.0 < self.router_top_p <= 1.0, "router_top_p",
             "must be None (off: plain top-k) or in (0, 1]")
        if self.has_moe:
            need(self.n_routed_experts > 0, "n_routed_experts", "MoE layers need experts")
            need(self.moe_intermediate_size > 0, "moe_intermediate_size", "must be positive")
            need(self.n_shared_experts >= 0, "n_shared_experts", "must be >= 0")
            need(self.n_group >= 1, "n_group", "must be >= 1")
            need(self.n_routed_experts % self.n_group == 0, "n_routed_experts",
                 f"must be divisible by n_group={self.n_group}")
            need(1 <= self.topk_group <= self.n_group, "topk_group",
                 f"must be in [1, n_group={self.n_group}]")
            kept = self.n_routed_experts // self.routing_groups * self.routing_topk_group
            need(1 <= self.num_experts_per_tok <= kept, "num_experts_per_tok",
                 f"must be in [1, {kept}] (experts in the topk_group={self.topk_group} kept "
                 f"groups of {self.n_routed_experts // self.n_group})")
            need(self.topk_method != "noaux_tc" or self.n_routed_experts // self.n_group >= 2,
                 "n_group", "noaux_tc scores a group by its top-2 experts: groups need >= 2 experts")
            if self.router_top_p is not None:
                need(1 <= self.routing_max_k <= kept, "router_max_k",
                     f"must be in [1, {kept}] (experts in the kept groups)")
                need(1 <= self.routing_min_k <= self.routing_max_k, "router_min_k",
                     f"must be in [1, router_max_k={self.routing_max_k}]")
                need(self.moe_capacity_factor is None, "moe_capacity_factor",
                     "top-p routing needs dropless dispatch (None)")
        if self.first_k_dense_replace > 0 or self.num_hidden_layers == 0:
            need(self.intermediate_size > 0, "intermediate_size", "dense layers need a width")
        if self.rope_type == "yarn":
            need(self.rope_factor > 0, "rope_factor", "must be positive")
            need(self.original_max_position_embeddings > 0, "original_max_position_embeddings",
                 "must be positive")

    # ---------------------------------------------------------------------------------- derived
    @property
    def has_moe(self) -> bool:
        return self.first_k_dense_replace < self.num_hidden_layers or self.num_nextn_predict_layers > 0

    @property
    def num_dense_layers(self) -> int:
        return self.first_k_dense_replace

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def routing_groups(self) -> int:
        """Groups the router actually uses ("greedy" ignores n_group, as the official code does)."""
        return 1 if self.topk_method == "greedy" else self.n_group

    @property
    def routing_topk_group(self) -> int:
        return 1 if self.topk_method == "greedy" else self.topk_group

    @property
    def routing_max_k(self) -> int:
        """Expert slots per token: num_experts_per_tok, or router_max_k under top-p routing."""
        if self.router_top_p is None or self.router_max_k is None:
            return self.num_experts_per_tok
        return self.router_max_k

    @property
    def routing_min_k(self) -> int:
        if self.router_min_k is not None:
            return self.router_min_k
        return min(2, self.routing_max_k)

    @property
    def has_router_bias(self) -> bool:
        """`e_score_correction_bias` exists only for the aux-loss-free ("noaux_tc") router."""
        return self.topk_method == "noaux_tc"

    @property
    def shared_intermediate_size(self) -> int:
        return self.n_shared_experts * self.moe_intermediate_size

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN (dsv3-spec §3.3)."""
        scale = self.qk_head_dim ** -0.5
        if self.rope_type == "yarn" and self.mscale_all_dim:
            m = yarn_mscale(self.rope_factor, self.mscale_all_dim)
            scale *= m * m
        return scale

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_k_dense_replace

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    # ------------------------------------------------------------------------------ HF mapping
    @classmethod
    def from_hf_config(cls, path_or_dict: str | os.PathLike | Mapping[str, Any], *,
                       source: str | None = None, **overrides) -> "ModelConfig":
        """Build from a Hugging Face `config.json` (a path to the file or its folder, or a dict).

        Every problem raises ConfigError naming the file (`source` names it for a dict), the
        field, and what was expected instead of what was found.
        """
        if isinstance(path_or_dict, Mapping):
            d, where = dict(path_or_dict), source or "config dict"
        else:
            p = os.fspath(path_or_dict)
            if os.path.isdir(p):
                p = os.path.join(p, "config.json")
            if not os.path.exists(p):
                raise FileNotFoundError(f"no config.json at {p}")
            d, where = read_json_object(p, ConfigError), p
        from jaxmoe.hf_config import from_hf_dict

        return from_hf_dict(d, where, overrides)

    def to_hf_config(self) -> dict[str, Any]:
        """A `config.json` dict that transformers' DeepseekV3Config/V2Config reads back."""
        from jaxmoe.hf_config import to_hf_dict

        return to_hf_dict(self)

    @classmethod
    def from_official_args(cls, args: Mapping[str, Any], **overrides) -> "ModelConfig":
        """Build from the official `inference/configs/*.json` (ModelArgs names)."""
        from jaxmoe.hf_config import from_official_args

        return from_official_args(args, **overrides)


_EXPECTED = {"int": "an integer", "float": "a number", "bool": "true or false",
             "str": "a string"}


@functools.cache
def field_kinds() -> dict[str, tuple[str, bool]]:
    """ModelConfig field -> (kind, accepts None), from the declared types ("int | None", ...)."""
    out = {}
    for f in dataclasses.fields(ModelConfig):
        parts = [t.strip() for t in str(f.type).split("|")]
        kind = next(t for t in parts if t != "None")
        assert kind in _EXPECTED, (f.name, f.type)  # a new field type needs a check below
        out[f.name] = (kind, "None" in parts)
    return out


def type_problem(value: Any, kind: str, optional: bool) -> str | None:
    """None when `value` fits `kind`, else "expected ..." for the message. Integers are never
    bools or floats (32.0 included: config.json writes widths as integers); numbers accept
    integers."""
    if value is None and optional:
        return None
    if kind == "bool":
        ok = isinstance(value, (bool, np.bool_))
    elif isinstance(value, bool):  # a bool is a numbers.Integral, never a width
        ok = False
    elif kind == "int":
        ok = isinstance(value, numbers.Integral)
    elif kind == "float":
        ok = isinstance(value, numbers.Real)
    else:
        ok = isinstance(value, str)
    return None if ok else f"expected {_EXPECTED[kind]}" + (" or None" if optional else "")


def read_json_object(path: str, error: type[Exception]) -> dict[str, Any]:
    """The JSON object in `path`; unreadable, malformed or non-object JSON raises `error`
    naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(d, dict):
        raise error(f"{path}: expected a JSON object, found {type(d).__name__}")
    return d


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0
