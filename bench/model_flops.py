"""bench_model.py's FLOP counts: the analytic model FLOPs per token behind its GFLOP/s and MFU,
and XLA's own count of a compiled executable."""

from __future__ import annotations


def model_flops(kw: dict, T: int) -> dict:
    """Analytic forward FLOPs per token (a multiply-add = 2 FLOPs) from HF config kwargs.

    Matmuls: 2 x (weights each token is multiplied through): per layer the MLA projections
    (q_a, q_b, kv_a, kv_b, o), and the dense SwiGLU (3*D*I) or, in MoE layers, the router (D*E),
    the K routed and the shared experts (3*D*F each); plus the LM head (D*V). The embedding lookup,
    norms, rope, softmax and SwiGLU elementwise work are not counted.
    Attention per token per layer: QK^T 2*S*N*(qk_nope+qk_rope), PV 2*S*N*v_head_dim, with
    S = (T+1)/2, the mean number of keys a causal query attends to (the causal half; computing
    the full T x T square would double this term). Training = 3 x forward.
    """
    D, V, L = kw["hidden_size"], kw["vocab_size"], kw["num_hidden_layers"]
    N = kw["num_attention_heads"]
    Hn, R, G = kw["qk_nope_head_dim"], kw["qk_rope_head_dim"], kw["v_head_dim"]
    C, Q = kw["kv_lora_rank"], kw.get("q_lora_rank")
    J = Hn + R
    q_proj = D * Q + Q * N * J if Q else D * N * J
    attn_w = q_proj + D * (C + R) + C * N * (Hn + G) + N * G * D
    k_dense = kw["first_k_dense_replace"]
    dense_ffn = 3 * D * kw["intermediate_size"]
    E, K = kw["n_routed_experts"], kw["num_experts_per_tok"]
    F, S = kw["moe_intermediate_size"], kw["n_shared_experts"]
    moe_active = D * E + (K + S) * 3 * D * F
    moe_total = D * E + (E + S) * 3 * D * F
    active = L * attn_w + k_dense * dense_ffn + (L - k_dense) * moe_active + D * V
    total = (V * D * (1 if kw.get("tie_word_embeddings") else 2) + L * attn_w
             + k_dense * dense_ffn + (L - k_dense) * moe_total)
    attn = L * 2 * ((T + 1) / 2) * N * (J + G)
    fwd = 2 * active + attn
    return {"active_matmul_params": active, "params_excl_norms": total, "matmul_fwd": 2 * active,
            "attn_fwd": attn, "attn_fwd_full_square": 2 * attn * T / (T + 1), "fwd": fwd,
            "train": 3 * fwd, "routed_fwd": (L - k_dense) * 2 * K * 3 * D * F}


def xla_flops(compiled) -> float | None:
    """XLA cost_analysis FLOPs of a compiled executable (it counts a loop body once), or None."""
    try:
        ca = compiled.cost_analysis()
        if isinstance(ca, (list, tuple)):
            ca = ca[0]
        return float(ca["flops"]) if ca and ca.get("flops") is not None else None
    except Exception:
        return None
