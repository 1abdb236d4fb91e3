"""Logical axis names and the einsum alphabet used throughout jaxmoe.

Einsum letters (parameter names carry them as a suffix, e.g. `wq_b_QNJ` is [Q, N, J]); the README's
table lists the same letters:

    B batch                                  M flattened tokens (B*T)
    T query position                         S key position
    D model (hidden)                         V vocabulary
    N attention heads                        J q/k head dim (nope + rope)
    H q/k nope head dim                      R q/k rope head dim
    G value head dim                         I kv_b output per head (H + G)
    Q q-lora rank                            C kv-lora rank
    P kv_a output (C + R, packed)            U MTP eh_proj input ([embedding; hidden], 2D)
    E routed experts                         K experts per token
    F FFN hidden                             Z gate and up, packed (2F)
    W expert-sorted pair rows (M*K + pad)    L layers in a scanned stack
    X a weight's flattened input             Y a weight's flattened output
    A LoRA rank

X and Y stand for whichever axes a generic op contracts and produces (a LoRA pair A [X, A] @ B [A, Y];
the grouped matmul's contraction and output width).

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
