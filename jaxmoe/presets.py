"""Named `ModelConfig` presets: the published DeepSeek configs and small ones for CPU work."""

from __future__ import annotations

from typing import Callable

from jaxmoe.config import ConfigError, ModelConfig


def deepseek_v3_671b(**kw) -> ModelConfig:
    """DeepSeek-V3 / R1 / V3.1 (671B main model + one MTP module), per the HF config.json."""
    return ModelConfig(**{"num_nextn_predict_layers": 1, **kw})


def deepseek_v2(**kw) -> ModelConfig:
    """DeepSeek-V2 (236B). mscale 0.707 follows the HF config (dsv3-spec §1.2 uncertainty 4)."""
    base = dict(vocab_size=102400, hidden_size=5120, intermediate_size=12288,
                moe_intermediate_size=1536, num_hidden_layers=60, first_k_dense_replace=1,
                num_attention_heads=128, n_routed_experts=160, n_shared_experts=2,
                num_experts_per_tok=6, n_group=8, topk_group=3, topk_method="group_limited_greedy",
                scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=16.0,
                q_lora_rank=1536, mscale=0.707, mscale_all_dim=0.707, bos_token_id=100000,
                eos_token_id=100001)
    return ModelConfig(**{**base, **kw})


def deepseek_v2_lite(**kw) -> ModelConfig:
    """DeepSeek-V2-Lite (16B): no query compression, softmax greedy routing over 64 experts."""
    base = dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                moe_intermediate_size=1408, num_hidden_layers=27, first_k_dense_replace=1,
                num_attention_heads=16, n_routed_experts=64, n_shared_experts=2,
                num_experts_per_tok=6, n_group=1, topk_group=1, topk_method="greedy",
                scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0,
                q_lora_rank=None, mscale=0.707, mscale_all_dim=0.707, bos_token_id=100000,
                eos_token_id=100001)
    return ModelConfig(**{**base, **kw})


def tiny(**kw) -> ModelConfig:
    """A V3-style model small enough to train on a laptop CPU (byte-level vocab of 256)."""
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                num_hidden_layers=3, first_k_dense_replace=1, num_nextn_predict_layers=1,
                num_attention_heads=4, n_routed_experts=8, n_shared_experts=1,
                num_experts_per_tok=2, n_group=2, topk_group=1, q_lora_rank=32, kv_lora_rank=16,
                qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, rope_type="default",
                max_position_embeddings=512, initializer_range=0.02)
    return ModelConfig(**{**base, **kw})


PRESETS: dict[str, Callable[..., ModelConfig]] = {
    "deepseek_v3_671b": deepseek_v3_671b,
    "deepseek_v2": deepseek_v2,
    "deepseek_v2_lite": deepseek_v2_lite,
    "tiny": tiny,
}


def get_preset(name: str, **kw) -> ModelConfig:
    try:
        return PRESETS[name.replace("-", "_")](**kw)
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}") from None
