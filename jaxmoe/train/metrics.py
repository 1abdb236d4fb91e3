"""Observability: model FLOPs and MFU, the per-step progress line, `metrics.jsonl` and
TensorBoard event files (`tb.py`; process 0 writes; a resumed run drops the lines past its
checkpoint, then appends)."""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np

from jaxmoe.config import ModelConfig

# Dense per-chip peaks in TFLOP/s: (bf16/fp16 tensor, float32 matmul as JAX runs it by default:
# TF32 on NVIDIA Ampere+, bf16 passes on TPU). Matched by substring of `device.device_kind`.
PEAK_TFLOPS: list[tuple[str, float, float]] = [
    ("H200", 989.0, 494.5), ("H100", 989.0, 494.5), ("H800", 989.0, 494.5),
    ("GH200", 989.0, 494.5), ("B200", 2250.0, 1125.0), ("A100", 312.0, 156.0),
    ("A800", 312.0, 156.0), ("L40S", 362.0, 183.0), ("L4", 121.0, 60.0), ("A10", 125.0, 62.5),
    ("V100", 125.0, 15.7), ("TPU v6", 918.0, 918.0), ("TPU v5p", 459.0, 459.0),
    ("TPU v5", 197.0, 197.0), ("TPU v4", 275.0, 275.0), ("TPU v3", 123.0, 123.0),
]


def log(msg: str) -> None:
    """A line of the trainer's log: stdout, from process 0 only."""
    import jax

    if jax.process_index() == 0:
        print(msg, flush=True)


def active_matmul_params(cfg: ModelConfig, with_mtp: bool) -> int:
    """Weights each token is multiplied through (the embedding lookup excluded)."""
    D, V, N = cfg.hidden_size, cfg.vocab_size, cfg.num_attention_heads
    J, R, C, G, H = cfg.qk_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank, cfg.v_head_dim, cfg.qk_nope_head_dim
    Q = cfg.q_lora_rank
    q = D * Q + Q * N * J if Q else D * N * J
    attn = q + D * (C + R) + C * N * (H + G) + N * G * D
    dense = 3 * D * cfg.intermediate_size
    E, K, F, S = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.n_shared_experts
    moe = D * E + (K + S) * 3 * D * F
    n = cfg.num_hidden_layers * attn + cfg.num_dense_layers * dense + cfg.num_moe_layers * moe + D * V
    if with_mtp:
        n += cfg.num_nextn_predict_layers * (2 * D * D + attn + (moe if cfg.has_moe else dense) + D * V)
    return n


def train_flops_per_token(cfg: ModelConfig, seq_len: int, with_mtp: bool) -> float:
    """6 x active matmul params + 3 x forward attention (QK^T and PV over the causal half:
    (T+1)/2 keys per query on average)."""
    layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if with_mtp else 0)
    attn_fwd = layers * 2 * ((seq_len + 1) / 2) * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    return 6.0 * active_matmul_params(cfg, with_mtp) + 3.0 * attn_fwd


def measure_cpu_matmul_tflops(n: int = 1024, reps: int = 5) -> float:
    """This host's float32 matmul rate (the MFU denominator on CPU, which declares no peak)."""
    import jax
    import jax.numpy as jnp

    a = jax.device_put(jnp.ones((n, n), jnp.float32), jax.local_devices()[0])
    f = jax.jit(jnp.dot)
    f(a, a).block_until_ready()
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e12


def peak_tflops(devices, dtype: str, override: float = 0.0) -> tuple[float, str]:
    """(total peak TFLOP/s over `devices`, how it was found)."""
    n = len(devices)
    if override > 0:
        return override * n, f"--log.peak_tflops {override} x {n}"
    kind = devices[0].device_kind
    if devices[0].platform == "cpu":
        hosts = len({d.process_index for d in devices})
        r = measure_cpu_matmul_tflops()
        return r * hosts, f"measured f32 matmul {r * 1e3:.0f} GFLOP/s x {hosts} host(s)"
    for name, bf16, f32 in PEAK_TFLOPS:
        if name.lower() in kind.lower():
            p = f32 if dtype == "float32" else bf16
            return p * n, f"{kind} {p} TFLOP/s ({dtype}) x {n}"
    return 0.0, f"unknown peak for {kind!r} (pass --log.peak_tflops)"


def _py(v):
    a = np.asarray(v)
    return a.item() if a.ndim == 0 else a.tolist()


class MetricsWriter:
    """`WORKDIR/metrics.jsonl` (one object per step) and `WORKDIR/tb` event files."""

    def __init__(self, workdir: str, resume_step: int, tensorboard: bool, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self.dropped = truncate_after(self.path, resume_step)
        self.f = open(self.path, "a")
        if tensorboard:
            from jaxmoe.train.tb import EventWriter

            self.tb = EventWriter(os.path.join(workdir, "tb"),
                                  purge_step=resume_step + 1 if resume_step else None)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        rec = {k: _py(v) for k, v in record.items()}
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        if self.tb is not None:
            scalars = {}
            for k, v in rec.items():
                if k == "step" or isinstance(v, bool):
                    continue
                if isinstance(v, (int, float)):
                    scalars[k] = v
                elif (isinstance(v, list) and len(v) <= 64
                      and all(isinstance(x, (int, float)) for x in v)):
                    scalars.update({f"{k}/layer{i}": x for i, x in enumerate(v)})
            self.tb.scalars(rec["step"], scalars)

    def close(self) -> None:
        if not self.enabled:
            return
        self.f.close()
        if self.tb is not None:
            self.tb.close()


def truncate_after(path: str, step: int) -> int:
    """Drop lines with step > `step` (written after the checkpoint a run resumes from) and any
    torn last line; returns how many were dropped."""
    if not os.path.exists(path):
        return 0
    keep, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if rec.get("step", 0) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)
    return dropped


def read_metrics(path: str) -> list[dict]:
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def progress_line(rec: dict, total: int) -> str:
    parts = [f"step {rec['step']:>{len(str(total))}}/{total}", f"loss {rec['loss']:.4f}"]
    if "phase" in rec:  # staged training (jaxmoe/train/staged.py)
        from jaxmoe.train.staged import PHASES

        parts.insert(1, f"phase {PHASES[int(rec['phase'])]}")
    if "eval_loss" in rec:
        parts.append(f"eval {rec['eval_loss']:.4f}")
    if "mtp_loss" in rec:
        parts.append(f"mtp {rec['mtp_loss']:.3f}")
    parts.append(f"lr {rec['lr']:.2e}")
    parts.append(f"gnorm {rec['grad_norm']:.2f}")
    if "tokens_per_s" in rec:
        parts.append(f"{rec['tokens_per_s']:,.0f} tok/s")
    if rec.get("mfu") is not None:
        parts.append(f"MFU {100 * rec['mfu']:.1f}%")
    if "load_max_over_mean" in rec:
        imb = ",".join(f"{x:.2f}" for x in np.atleast_1d(rec["load_max_over_mean"]))
        dead = ",".join(str(int(x)) for x in np.atleast_1d(rec["dead_experts"]))
        parts.append(f"load max/mean {imb} dead {dead}")
    if "experts_per_token" in rec and _varies(rec):
        parts.append("experts/token " + ",".join(
            f"{x:.2f}" for x in np.atleast_1d(rec["experts_per_token"])))
    if "router_bias_norm" in rec:
        parts.append("|b| " + ",".join(f"{x:.3f}" for x in np.atleast_1d(rec["router_bias_norm"])))
    return " | ".join(parts)


def _varies(rec: dict) -> bool:
    """Experts per token differ from a whole number (top-p routing): worth a column."""
    x = np.atleast_1d(rec["experts_per_token"])
    return bool(np.any(np.abs(x - np.round(x)) > 1e-6))
