"""Logical axis names and the einsum alphabet used throughout jaxmoe.

Einsum letters (parameter names carry them as a suffix, e.g. `wq_b_QNJ` is [Q, N, J]):

    B batch                  T query position         S key position
    D model (hidden)         N attention heads        J q/k head dim (nope + rope)
    H qk nope head dim       R qk rope head dim       G value head dim
    Q q-lora rank            C kv-lora rank           P kv_a output (C + R, packed)
    I kv_b output per head (H + G)                    V vocabulary
    E routed experts         K experts per token      F ffn hidden
    M flattened tokens (B*T) L layers in a scanned stack

Logical axis names below are the only sharding vocabulary the model code knows; mesh presets in
`pjit_configs/` map them to mesh axes.
"""

# Parameter axes
EMBED = "embed"
VOCAB = "vocab"
HEADS = "heads"
HEAD_DIM = "head_dim"
Q_LORA = "q_lora"
KV_LORA = "kv_lora"
MLP = "mlp"
EXPERT = "expert"
EXPERT_MLP = "expert_mlp"
LAYERS = "layers"
NORM = "norm"

# Activation axes
ACT_BATCH = "act_batch"
ACT_SEQ = "act_seq"
ACT_EMBED = "act_embed"
ACT_HEADS = "act_heads"
ACT_TOKENS = "act_tokens"
