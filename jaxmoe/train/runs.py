"""The named runs `jaxmoe-train --config NAME` starts from (each a full TrainConfig that flags
then override): tiny, tiny-debug, bench-small, v2-lite-finetune, v2-lite-lora."""

from __future__ import annotations

from typing import Callable

from jaxmoe.train.config import (CheckpointSection, DataSection, LogSection, LoraSection,
                                 LossSection, ModelSection, OptimSection, TrainConfig,
                                 TrainConfigError)


RUNS: dict[str, Callable[[], TrainConfig]] = {}


def register(fn: Callable[[], TrainConfig]) -> Callable[[], TrainConfig]:
    RUNS[fn.__name__.replace("_", "-")] = fn
    return fn


@register
def tiny() -> TrainConfig:
    """The `tiny` preset on the built-in byte-level stdlib corpus: a few minutes on a CPU."""
    return TrainConfig(steps=500, data=DataSection(batch_size=32), optim=OptimSection(warmup_steps=30),
                       log=LogSection(eval_every=100))


@register
def tiny_debug() -> TrainConfig:
    """Seconds: a 2-layer tiny model on short rows (tests, smoke runs)."""
    return TrainConfig(
        name="tiny-debug", steps=20, workdir="runs/tiny-debug",
        model=ModelSection(overrides="num_hidden_layers=2"),
        data=DataSection(seq_len=32, batch_size=8, eval_batches=2, max_bytes=2_000_000),
        optim=OptimSection(warmup_steps=5),
        ckpt=CheckpointSection(every=10),
        log=LogSection(eval_every=10, sample_bytes=0))


@register
def bench_small() -> TrainConfig:
    """The `bench-small` shape of shared/bench/bench_configs.json (8 x 256 rows) on the corpus."""
    return TrainConfig(
        name="bench-small", steps=50, workdir="runs/bench-small",
        model=ModelSection(overrides=(
            "vocab_size=8192,hidden_size=512,intermediate_size=1024,moe_intermediate_size=128,"
            "num_hidden_layers=6,num_nextn_predict_layers=0,num_attention_heads=8,"
            "n_routed_experts=32,num_experts_per_tok=4,n_group=4,topk_group=2,q_lora_rank=192,"
            "kv_lora_rank=128,qk_nope_head_dim=64,qk_rope_head_dim=32,v_head_dim=64")),
        data=DataSection(seq_len=256, batch_size=8),
        optim=OptimSection(lr=1e-3),
        log=LogSection(sample_bytes=0))


@register
def v2_lite_finetune() -> TrainConfig:
    """Fine-tune a converted DeepSeek-V2-Lite (pass --model.init_from and --data.*)."""
    return TrainConfig(
        name="v2-lite-finetune", steps=1000, workdir="runs/v2-lite",
        model=ModelSection(preset="deepseek_v2_lite", dtype="bfloat16", remat=True),
        data=DataSection(source="jsonl", seq_len=2048, batch_size=64),
        optim=OptimSection(lr=1e-5, warmup_steps=50),
        loss=LossSection(mtp_weight=0.0, bias_update_speed=0.0),
        log=LogSection(eval_every=100, sample_bytes=0))


@register
def v2_lite_lora() -> TrainConfig:
    """LoRA on a converted DeepSeek-V2-Lite (the guide's rank 16, alpha 32, dropout 0.1 on the
    MLA projections); pass --model.init_from and --data.*; `jaxmoe-train merge` folds it in."""
    return TrainConfig(
        name="v2-lite-lora", steps=1000, workdir="runs/v2-lite-lora",
        model=ModelSection(preset="deepseek_v2_lite", dtype="bfloat16", param_dtype="bfloat16",
                           remat=True),
        data=DataSection(source="jsonl", seq_len=2048, batch_size=64),
        optim=OptimSection(lr=2e-4, warmup_steps=50, weight_decay=0.0),
        loss=LossSection(mtp_weight=0.0, bias_update_speed=0.0),
        lora=LoraSection(rank=16),
        log=LogSection(eval_every=100, sample_bytes=0))


def get_run(name: str) -> TrainConfig:
    key = name.replace("_", "-")
    if key not in RUNS:
        raise TrainConfigError(f"--config={name!r}: unknown run; known: {sorted(RUNS)}")
    return RUNS[key]()
