"""The one declarative HF <-> jaxmoe parameter table, with its small pure transforms.

Each row maps a published tensor name template to a path in the jaxmoe state and a transform
from the PyTorch `[out, in]` layout to ours. `{L}` is the checkpoint layer index, `{E}` the
expert. The loader (`hf_io`), the converter and the exporter all walk `entries(cfg)`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import numpy as np

from jaxmoe.config import ModelConfig

# --------------------------------------------------------------------------------- transforms
# Each is (to_jaxmoe, to_hf); both pure numpy, shapes given the config.


def _copy(a, cfg):
    return a


def _t(a, cfg):
    return np.ascontiguousarray(a.T)  # [out, in] -> [in, out]


def _q_heads(a, cfg):
    """[N*J, A] -> [A, N, J]."""
    N = cfg.num_attention_heads
    return np.ascontiguousarray(a.reshape(N, -1, a.shape[-1]).transpose(2, 0, 1))  # [N, J, A] -> [A, N, J]


def _q_heads_inv(a, cfg):
    """[A, N, J] -> [N*J, A]."""
    return np.ascontiguousarray(a.transpose(1, 2, 0).reshape(-1, a.shape[0]))  # [N, J, A] -> [N*J, A]


def _o_heads(a, cfg):
    """o_proj [D, N*G] -> [N, G, D]."""
    N = cfg.num_attention_heads
    return np.ascontiguousarray(a.reshape(a.shape[0], N, -1).transpose(1, 2, 0))  # [D, N, G] -> [N, G, D]


def _o_heads_inv(a, cfg):
    """[N, G, D] -> [D, N*G]."""
    return np.ascontiguousarray(a.transpose(2, 0, 1).reshape(a.shape[-1], -1))  # [D, N, G] -> [D, N*G]


TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    "copy": (_copy, _copy),
    "T": (_t, _t),
    "q_heads": (_q_heads, _q_heads_inv),
    "o_heads": (_o_heads, _o_heads_inv),
}

# ----------------------------------------------------------------------------------- tables
GLOBAL = [
    ("model.embed_tokens.weight", "embed_VD", "copy"),
    ("model.norm.weight", "final_norm/scale", "copy"),
    ("lm_head.weight", "lm_head_DV", "T"),
]
ATTN = [
    ("input_layernorm.weight", "attn_norm/scale", "copy"),
    ("post_attention_layernorm.weight", "ffn_norm/scale", "copy"),
    ("self_attn.kv_a_proj_with_mqa.weight", "attn/wkv_a_DP", "T"),
    ("self_attn.kv_a_layernorm.weight", "attn/kv_norm/scale", "copy"),
    ("self_attn.kv_b_proj.weight", "attn/wkv_b_CNI", "q_heads"),
    ("self_attn.o_proj.weight", "attn/wo_NGD", "o_heads"),
]
Q_PLAIN = [("self_attn.q_proj.weight", "attn/wq_DNJ", "q_heads")]
Q_LORA = [
    ("self_attn.q_a_proj.weight", "attn/wq_a_DQ", "T"),
    ("self_attn.q_a_layernorm.weight", "attn/q_norm/scale", "copy"),
    ("self_attn.q_b_proj.weight", "attn/wq_b_QNJ", "q_heads"),
]
DENSE_FFN = [
    ("mlp.gate_proj.weight", "ffn/w_gate_DF", "T"),
    ("mlp.up_proj.weight", "ffn/w_up_DF", "T"),
    ("mlp.down_proj.weight", "ffn/w_down_FD", "T"),
]
MOE_FFN = [("mlp.gate.weight", "ffn/router/w_DE", "T")]
ROUTER_BIAS = [("mlp.gate.e_score_correction_bias", "ffn/router/bias_E", "copy")]
SHARED = [
    ("mlp.shared_experts.gate_proj.weight", "ffn/shared/w_gate_DF", "T"),
    ("mlp.shared_experts.up_proj.weight", "ffn/shared/w_up_DF", "T"),
    ("mlp.shared_experts.down_proj.weight", "ffn/shared/w_down_FD", "T"),
]
EXPERT = [  # per expert E, stacked on the leading [E] axis
    ("mlp.experts.{E}.gate_proj.weight", "ffn/w_gate_EDF", "T"),
    ("mlp.experts.{E}.up_proj.weight", "ffn/w_up_EDF", "T"),
    ("mlp.experts.{E}.down_proj.weight", "ffn/w_down_EFD", "T"),
]
MTP_EXTRA = [
    ("embed_tokens.weight", "embed_VD", "copy"),
    ("enorm.weight", "enorm/scale", "copy"),
    ("hnorm.weight", "hnorm/scale", "copy"),
    ("eh_proj.weight", "eh_proj_UD", "T"),
    ("shared_head.norm.weight", "head_norm/scale", "copy"),
    ("shared_head.head.weight", "head_DV", "T"),
]


@dataclasses.dataclass(frozen=True)
class Entry:
    """One published tensor. `path` addresses a jaxmoe state leaf; `index` selects the slab of
    it this tensor fills (stack layer and/or expert), empty for a whole-array tensor."""

    hf_name: str
    path: tuple
    index: tuple
    transform: str
    fp8_eligible: bool  # a linear weight inside a decoder layer (stored FP8 in the V3 release)

    def to_jaxmoe(self, a: np.ndarray, cfg: ModelConfig) -> np.ndarray:
        return TRANSFORMS[self.transform][0](a, cfg)

    def to_hf(self, a: np.ndarray, cfg: ModelConfig) -> np.ndarray:
        return TRANSFORMS[self.transform][1](a, cfg)


def _split(path: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in path.split("/"))


def layer_rows(cfg: ModelConfig, moe: bool) -> list[tuple[str, str, str]]:
    rows = ATTN + (Q_PLAIN if cfg.q_lora_rank is None else Q_LORA)
    if not moe:
        return rows + DENSE_FFN
    rows = rows + MOE_FFN + (ROUTER_BIAS if cfg.has_router_bias else [])
    return rows + (SHARED if cfg.n_shared_experts else [])


def _layer_entries(cfg, L, prefix, index, moe) -> Iterator[Entry]:
    for hf, path, tr in layer_rows(cfg, moe):
        yield Entry(f"model.layers.{L}.{hf}", prefix + _split(path), index, tr,
                    hf.endswith(("proj.weight", "proj_with_mqa.weight")) and "eh_proj" not in hf)
    if moe:
        for e in range(cfg.n_routed_experts):
            for hf, path, tr in EXPERT:
                yield Entry(f"model.layers.{L}.{hf.format(E=e)}", prefix + _split(path),
                            index + (e,), tr, True)


def entries(cfg: ModelConfig, include_mtp: bool = True) -> Iterator[Entry]:
    """Every published tensor of `cfg` (scales excluded), in checkpoint order."""
    for hf, path, tr in GLOBAL:
        yield Entry(hf, _split(path), (), tr, False)
    k = cfg.num_dense_layers
    for L in range(cfg.num_hidden_layers):
        if L < k:
            yield from _layer_entries(cfg, L, ("dense_layers",), (L,), moe=False)
        else:
            yield from _layer_entries(cfg, L, ("moe_layers",), (L - k,), moe=True)
    if include_mtp:
        for i in range(cfg.num_nextn_predict_layers):
            L = cfg.num_hidden_layers + i
            for hf, path, tr in MTP_EXTRA:
                yield Entry(f"model.layers.{L}.{hf}", ("mtp", i) + _split(path), (), tr, False)
            yield from _layer_entries(cfg, L, ("mtp", i, "layer"), (), cfg.is_moe_layer(L))
