"""jaxmoe-plan on a scaled-down model on cpu-8: the per-device parameter, optimizer and gradient
figures equal a hand count of the tiny model's shards under the preset's rules, and XLA's own
argument size of the compiled step agrees with them; the CLI refuses an unknown mesh."""

import subprocess
import sys

import pytest

from jaxmoe import plan as plan_lib

FAST = {"xla_backend_optimization_level": 0}


def hand_count(D=64, V=256, Q=32, C=16, R=8, N=4, H=16, G=16, F=128, Fm=32, Fs=32, E=8):
    """Per-device parameter elements of tiny (1 dense + 1 MoE layer, no MTP) on cpu-8:
    fsdp 2 x expert 2 x tensor 2. Rules: embed and q/kv-LoRA rank over fsdp x expert (4),
    vocab / heads / mlp / expert_mlp over tensor (2), experts over expert (2); in a tensor the
    first dimension keeps its mesh axes, so the experts' embed dim is split over fsdp only."""
    J, I = H + R, H + G
    attn = (D * Q / 4            # wq_a_DQ: embed/4 (q_lora finds fsdp, expert taken)
            + Q * N * J / 8      # wq_b_QNJ: q_lora/4, heads/2
            + D * (C + R) / 4    # wkv_a_DP: embed/4
            + C * N * I / 8      # wkv_b_CNI: kv_lora/4, heads/2
            + N * G * D / 8      # wo_NGD: heads/2, embed/4
            + Q + C + 2 * D)     # q_norm, kv_norm, attn_norm, ffn_norm: replicated
    dense = attn + 3 * D * F / 8                  # gate/up/down: embed/4, mlp/2
    moe = (attn + D * E / 4                       # router w_DE: embed/4
           + 3 * E * D * Fm / 8                   # experts: E/2, embed/2 (fsdp), F/2
           + 3 * D * Fs / 8)                      # shared expert
    top = V * D / 8 * 2 + D                       # embed_VD, lm_head_DV, final_norm
    bias = E                                      # router e_score_correction_bias: replicated
    return dense + moe + top, bias


@pytest.mark.parametrize("moments,size", [("float32", 4), ("bfloat16", 2)])
def test_plan_parameters_match_hand_count(moments, size):
    r = plan_lib.plan("tiny", "cpu-8", seq=16, rows_per_shard=1, param_dtype="float32",
                      dtype="float32", remat=True, fit=False, compiler_options=FAST,
                      overrides={"num_hidden_layers": 2, "num_nextn_predict_layers": 0},
                      moments_dtype=moments)
    params, bias = hand_count()
    b = r["bytes"]
    assert b["parameters"] == 4 * (params + bias)
    assert b["gradients"] == 4 * params                # router biases get no gradient
    # AdamW mu + nu in the moments' dtype (+ step counts)
    assert 2 * size * params <= b["optimizer"] <= 2 * size * params + 16
    assert r["global_batch"] == 4 and r["ep"] == "allgather"
    # XLA's argument bytes of the compiled step = parameters + optimizer state + batch + RNG
    # key (8 bytes) + step (4 bytes): the sharded layout XLA compiled is the one counted
    c = r["compiled"][0]
    assert c["argument"] == b["parameters"] + b["optimizer"] + b["batch"] + 12
    assert b["activations"] > 0 and b["total"] == sum(
        b[k] for k in ("parameters", "optimizer", "gradients", "activations", "batch"))
    assert r["fits"] is None  # no HBM figure for the simulated CPU preset
    text = plan_lib.table(r)
    assert "tiny" in text and "cpu-8" in text and "parameters" in text and "MiB" in text


def test_plan_cli_rejects_unknown_mesh():
    p = subprocess.run([sys.executable, "-m", "jaxmoe.plan", "--mesh", "tpu-9000"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "unknown mesh preset 'tpu-9000'" in p.stderr
