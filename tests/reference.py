"""Small reference functions written from the spec (dsv3-spec.md sections 2-5, 9, 10), numpy float64.

Official DeepSeek semantics unless a parameter says otherwise. Pure numpy (+ torch/transformers for the MTP
block, which reuses transformers' own DeepseekV3DecoderLayer); never imports jax or jaxmoe.

Public API:
    rms_norm_ref(x, w, eps=1e-6)
    router_ref(x, w, bias, *, score_func, n_group, topk_group, top_k, group_score=None, norm_topk_prob,
               route_scale, mask_value=-inf) -> (weights [T, K], idx [T, K])   idx sorted ascending per token
    default_inv_freq_ref(rope_dim, theta)
    yarn_inv_freq_ref(rope_dim, theta, factor, original_max_pos, beta_fast=32, beta_slow=1, truncate=True)
    inv_freq_ref(rope_dim, rope_parameters)
    yarn_mscale_ref(factor, mscale=1.0)
    softmax_scale_ref(qk_head_dim, rope_parameters=None)
    rope_attention_factor_ref(rope_parameters)          HF's cos/sin multiplier (1.0 for every release)
    rope_interleaved_ref(x [..., T, R], positions [T], inv_freq, scale=1.0)
    mla_ref(x [B, T, D], weights, config, positions=None, absorb=False, hf_attention_factor=True) -> [B, T, D]
    make_mtp_weights(config, seed=0, init_std=0.02, share_from=None) -> dict[str, np.ndarray]
    build_mtp_layer(config, weights) -> transformers DeepseekV3DecoderLayer
    mtp_ref(config, weights, h [B, T, D], tokens [B, T], layer=None, zero_first_embed=False,
            return_hidden=False) -> logits [B, T-1, V] (float32)
"""

from __future__ import annotations

import math
import re

import numpy as np

# --------------------------------------------------------------------------------------------------------------
# Norm and router (spec 2.1, 4.2)
# --------------------------------------------------------------------------------------------------------------


def rms_norm_ref(x, w, eps=1e-6):
    x = np.asarray(x, np.float64)
    return np.asarray(w, np.float64) * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def _softmax(x, axis=-1):
    x = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(x)
    return e / np.sum(e, axis=axis, keepdims=True)


def router_ref(x, w, bias=None, *, score_func="sigmoid", n_group=1, topk_group=1, top_k, group_score=None,
               norm_topk_prob, route_scale, mask_value=-np.inf):
    """Official Gate.forward in float64. x [T, D] (the ffn_norm output), w [E, D], bias [E] or None.

    1. s = sigmoid(x w^T) or softmax(x w^T);  2. s_sel = s + bias (selection only);
    3. if n_group > 1: group score = sum of the top-2 s_sel per group ("top2_sum", official when a bias
       exists, HF V3 always) or the max ("max", V2 group_limited_greedy); keep the top `topk_group` groups and
       set s_sel of the others to `mask_value` (official -inf; HF V2 uses 0.0, HF V3 in transformers 5.x -inf);
    4. idx = top_k(s_sel);  5. weights = s[idx] (unbiased scores);
    6. if norm_topk_prob: weights /= sum(weights) (HF adds 1e-20 to the denominator: irrelevant in float64);
    7. weights *= route_scale.
    group_score None picks the official rule: "top2_sum" if bias is not None else "max".
    Returns (weights [T, K] float64, idx [T, K] int64) with idx SORTED ASCENDING per token and weights aligned,
    so results compare directly with any implementation after the same sort."""
    x = np.asarray(x, np.float64)
    logits = x @ np.asarray(w, np.float64).T
    if score_func == "sigmoid":
        s = 1.0 / (1.0 + np.exp(-logits))
    elif score_func == "softmax":
        s = _softmax(logits)
    else:
        raise ValueError(score_func)
    sel = s + np.asarray(bias, np.float64) if bias is not None else s.copy()
    T, E = sel.shape
    if n_group > 1:
        if group_score is None:
            group_score = "top2_sum" if bias is not None else "max"
        g = sel.reshape(T, n_group, E // n_group)
        if group_score == "top2_sum":
            gs = np.sort(g, axis=-1)[..., -2:].sum(-1)
        elif group_score == "max":
            gs = g.max(-1)
        else:
            raise ValueError(group_score)
        keep = np.argsort(-gs, axis=-1, kind="stable")[:, :topk_group]
        gmask = np.zeros((T, n_group), bool)
        np.put_along_axis(gmask, keep, True, axis=-1)
        sel = np.where(np.repeat(gmask, E // n_group, axis=-1), sel, mask_value)
    idx = np.sort(np.argsort(-sel, axis=-1, kind="stable")[:, :top_k], axis=-1)
    wts = np.take_along_axis(s, idx, axis=-1)
    if norm_topk_prob:
        wts = wts / wts.sum(-1, keepdims=True)
    return wts * route_scale, idx.astype(np.int64)


# --------------------------------------------------------------------------------------------------------------
# RoPE / YaRN / softmax scale (spec 3.3, 3.4)
# --------------------------------------------------------------------------------------------------------------


def default_inv_freq_ref(rope_dim, theta):
    return 1.0 / theta ** (np.arange(0, rope_dim, 2, dtype=np.float64) / rope_dim)


def yarn_inv_freq_ref(rope_dim, theta, factor, original_max_pos, beta_fast=32, beta_slow=1, truncate=True):
    """f'_i = f_i * keep_i + (f_i / factor) * (1 - keep_i), keep_i = 1 - clamp((i - low) / (high - low), 0, 1),
    low/high from the correction dims of beta_fast / beta_slow at L0 = original_max_pos (floored / ceiled)."""
    f = default_inv_freq_ref(rope_dim, theta)

    def corr_dim(n):
        return rope_dim * math.log(original_max_pos / (n * 2 * math.pi)) / (2 * math.log(theta))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rope_dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(rope_dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    keep = 1.0 - ramp
    return f * keep + (f / factor) * (1.0 - keep)


def inv_freq_ref(rope_dim, rope_parameters):
    rp = dict(rope_parameters or {})
    theta = rp.get("rope_theta", 10000.0)
    if rp.get("rope_type", "default") == "default":
        return default_inv_freq_ref(rope_dim, theta)
    if rp["rope_type"] != "yarn":
        raise NotImplementedError(rp["rope_type"])
    return yarn_inv_freq_ref(rope_dim, theta, rp["factor"], rp["original_max_position_embeddings"],
                             rp.get("beta_fast") or 32, rp.get("beta_slow") or 1, rp.get("truncate", True))


def yarn_mscale_ref(factor, mscale=1.0):
    """m = 0.1 * mscale * ln(factor) + 1 (1.0 when factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def softmax_scale_ref(qk_head_dim, rope_parameters=None):
    """qk_head_dim^-0.5, times m(factor, mscale_all_dim)^2 when the rope type is not "default" and
    mscale_all_dim is set and non-zero (HF V3 and, in transformers 5.x, HF V2). Official code uses `mscale`
    instead of `mscale_all_dim`; both are equal in every released config."""
    scale = qk_head_dim ** -0.5
    rp = rope_parameters or {}
    if rp.get("rope_type", "default") != "default" and rp.get("mscale_all_dim"):
        scale *= yarn_mscale_ref(rp["factor"], rp["mscale_all_dim"]) ** 2
    return scale


def rope_attention_factor_ref(rope_parameters):
    """HF's multiplier on cos AND sin (so q_pe.k_pe scales by its square); official code has none.
    yarn: attention_factor if given, else m(f, mscale)/m(f, mscale_all_dim) when both set, else m(f, 1)."""
    rp = rope_parameters or {}
    if rp.get("rope_type", "default") != "yarn":
        return 1.0
    if rp.get("attention_factor") is not None:
        return float(rp["attention_factor"])
    f = rp["factor"]
    if rp.get("mscale") and rp.get("mscale_all_dim"):
        return yarn_mscale_ref(f, rp["mscale"]) / yarn_mscale_ref(f, rp["mscale_all_dim"])
    return yarn_mscale_ref(f)


def rope_interleaved_ref(x, positions, inv_freq, scale=1.0):
    """Official (complex-pair) RoPE: pair i = (x[2i], x[2i+1]) rotated by angle positions[t] * inv_freq[i].
    x [..., T, R]; output has the same layout (NOT HF's de-interleaved order). `scale` multiplies the result
    (HF's attention_factor)."""
    x = np.asarray(x, np.float64)
    ang = np.asarray(positions, np.float64)[:, None] * np.asarray(inv_freq, np.float64)[None, :]  # [T, R/2]
    c = x[..., 0::2] + 1j * x[..., 1::2]
    y = c * np.exp(1j * ang)
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = y.real, y.imag
    return out * scale


# --------------------------------------------------------------------------------------------------------------
# MLA (spec 3.1, 3.2, 3.5)
# --------------------------------------------------------------------------------------------------------------


def _cfg(config, name, default=None):
    return config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)


def mla_ref(x, weights, config, positions=None, absorb=False, hf_attention_factor=True):
    """Causal MLA forward in float64. x [B, T, D] is the input_layernorm output; weights keyed relative to the
    attention module ("q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight" or "q_proj.weight",
    "kv_a_proj_with_mqa.weight", "kv_a_layernorm.weight", "kv_b_proj.weight", "o_proj.weight") or with any
    prefix ending in "self_attn." (stripped). config: a transformers config or dict of the same fields.
    absorb=True uses the official absorbed form (latent cache). hf_attention_factor applies HF's cos/sin factor."""
    w = {re.sub(r"^.*self_attn\.", "", k): np.asarray(v, np.float64) for k, v in weights.items()}
    H = _cfg(config, "num_attention_heads")
    dn, dr, dv = _cfg(config, "qk_nope_head_dim"), _cfg(config, "qk_rope_head_dim"), _cfg(config, "v_head_dim")
    r = _cfg(config, "kv_lora_rank")
    eps = _cfg(config, "rms_norm_eps", 1e-6)
    rp = _cfg(config, "rope_parameters")
    x = np.asarray(x, np.float64)
    B, T, _ = x.shape
    pos = np.arange(T) if positions is None else np.asarray(positions)
    if "q_proj.weight" in w:
        q = x @ w["q_proj.weight"].T
    else:
        q = rms_norm_ref(x @ w["q_a_proj.weight"].T, w["q_a_layernorm.weight"], eps) @ w["q_b_proj.weight"].T
    q = q.reshape(B, T, H, dn + dr).transpose(0, 2, 1, 3)                                  # [B, H, T, dqk]
    kv = x @ w["kv_a_proj_with_mqa.weight"].T
    c = rms_norm_ref(kv[..., :r], w["kv_a_layernorm.weight"], eps)                        # [B, T, r]
    af = rope_attention_factor_ref(rp) if hf_attention_factor else 1.0
    inv = inv_freq_ref(dr, rp)
    q_pe = rope_interleaved_ref(q[..., dn:], pos, inv, af)
    k_pe = rope_interleaved_ref(kv[..., r:], pos, inv, af)                                # [B, T, dr]
    wkv_b = w["kv_b_proj.weight"].reshape(H, dn + dv, r)
    w_uk, w_uv = wkv_b[:, :dn], wkv_b[:, dn:]
    if absorb:
        q_abs = np.einsum("bhtd,hdr->bhtr", q[..., :dn], w_uk)
        s = np.einsum("bhtr,bsr->bhts", q_abs, c) + np.einsum("bhtd,bsd->bhts", q_pe, k_pe)
    else:
        k_nope = np.einsum("bsr,hdr->bhsd", c, w_uk)
        s = np.einsum("bhtd,bhsd->bhts", q[..., :dn], k_nope) + np.einsum("bhtd,bsd->bhts", q_pe, k_pe)
    s = s * softmax_scale_ref(dn + dr, rp)
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    p = _softmax(s)
    if absorb:
        o = np.einsum("hvr,bhtr->bthv", w_uv, np.einsum("bhts,bsr->bhtr", p, c))
    else:
        o = np.einsum("bhts,bhsv->bthv", p, np.einsum("bsr,hvr->bhsv", c, w_uv))
    return o.reshape(B, T, H * dv) @ w["o_proj.weight"].T


# --------------------------------------------------------------------------------------------------------------
# MTP (spec 5)
# --------------------------------------------------------------------------------------------------------------

_EXPERT_RE = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_MTP_EXTRA = ("embed_tokens.weight", "enorm.weight", "hnorm.weight", "eh_proj.weight",
              "shared_head.norm.weight", "shared_head.head.weight")


def _prefix(config):
    return f"model.layers.{config.num_hidden_layers}."


def make_mtp_weights(config, seed=0, init_std=0.02, share_from=None):
    """Random MTP weights under published names "model.layers.{num_hidden_layers}.*": the six MTP tensors
    plus a full MoE decoder layer (per-expert names, e_score_correction_bias included). Same randomisation as
    the oracle (norms 1 + 0.1 N, bias 0.05 N, others init_std N). share_from: an HF causal-LM whose
    embed_tokens / lm_head are copied into embed_tokens / shared_head.head (as the release "shares" them)."""
    import torch
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer

    D, V, pre = config.hidden_size, config.vocab_size, _prefix(config)
    torch.manual_seed(seed)
    layer = DeepseekV3DecoderLayer(config, layer_idx=config.num_hidden_layers)
    g = torch.Generator().manual_seed(seed)
    out = {}

    def rnd(shape, norm=False, s=init_std):
        r = torch.randn(shape, generator=g, dtype=torch.float32).numpy().astype(np.float32)
        return (1.0 + 0.1 * r) if norm else s * r

    for name, t in layer.state_dict().items():
        shape = tuple(t.shape)
        if name.endswith("e_score_correction_bias"):
            out[pre + name] = rnd(shape, s=0.05)
        elif name.endswith("experts.gate_up_proj"):
            a = rnd(shape)
            i = shape[1] // 2
            for e in range(shape[0]):
                out[f"{pre}mlp.experts.{e}.gate_proj.weight"] = np.ascontiguousarray(a[e, :i])
                out[f"{pre}mlp.experts.{e}.up_proj.weight"] = np.ascontiguousarray(a[e, i:])
        elif name.endswith("experts.down_proj"):
            a = rnd(shape)
            for e in range(shape[0]):
                out[f"{pre}mlp.experts.{e}.down_proj.weight"] = np.ascontiguousarray(a[e])
        else:
            out[pre + name] = rnd(shape, norm=bool(re.search(r"norm\.weight$", name)))
    for n in ("enorm.weight", "hnorm.weight", "shared_head.norm.weight"):
        out[pre + n] = rnd((D,), norm=True)
    out[pre + "eh_proj.weight"] = rnd((D, 2 * D))
    out[pre + "embed_tokens.weight"] = rnd((V, D))
    out[pre + "shared_head.head.weight"] = rnd((V, D))
    if share_from is not None:
        out[pre + "embed_tokens.weight"] = share_from.model.embed_tokens.weight.detach().float().numpy().copy()
        out[pre + "shared_head.head.weight"] = share_from.lm_head.weight.detach().float().numpy().copy()
    return out


def build_mtp_layer(config, weights):
    """transformers DeepseekV3DecoderLayer(config, layer_idx=num_hidden_layers) loaded from published names."""
    import torch
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer

    pre = _prefix(config)
    layer = DeepseekV3DecoderLayer(config, layer_idx=config.num_hidden_layers).to(torch.float32).eval()
    sd = {}
    experts: dict[int, dict[str, np.ndarray]] = {}
    for k, v in weights.items():
        if not k.startswith(pre) or k[len(pre):] in _MTP_EXTRA:
            continue
        rel = k[len(pre):]
        m = _EXPERT_RE.match(rel)
        if m:
            experts.setdefault(int(m.group(1)), {})[m.group(2)] = np.asarray(v, np.float32)
        else:
            sd[rel] = torch.from_numpy(np.asarray(v, np.float32))
    if experts:
        n = len(experts)
        sd["mlp.experts.gate_up_proj"] = torch.from_numpy(
            np.stack([np.concatenate([experts[e]["gate_proj"], experts[e]["up_proj"]], 0) for e in range(n)]))
        sd["mlp.experts.down_proj"] = torch.from_numpy(np.stack([experts[e]["down_proj"] for e in range(n)]))
    layer.load_state_dict(sd, strict=True)
    return layer


def mtp_ref(config, weights, h, tokens, layer=None, zero_first_embed=False, return_hidden=False):
    """MTP depth 1 (spec 5.2), float32 torch. h [B, T, D]: main-model hidden states AFTER the final norm;
    tokens [B, T]. For i in 0..T-2: x_i = eh_proj(concat(enorm(emb(t_{i+1})), hnorm(h_i))) (embedding first),
    then the MTP decoder layer with its own causal attention over positions 0..T-2, then
    logits = shared_head.head(shared_head.norm(out)). Returns logits [B, T-1, V] (and out [B, T-1, D] if
    return_hidden). zero_first_embed mimics vLLM (embedding at position 0 zeroed); off by default."""
    import torch
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    pre = _prefix(config)
    W = {n: torch.from_numpy(np.asarray(weights[pre + n], np.float32)) for n in _MTP_EXTRA}
    if layer is None:
        layer = build_mtp_layer(config, weights)
    eps = config.rms_norm_eps

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    tok = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    hh = torch.from_numpy(np.asarray(h, np.float32))[:, :-1]
    emb = W["embed_tokens.weight"][tok[:, 1:]]
    if zero_first_embed:
        emb[:, 0] = 0.0
    S = emb.shape[1]
    with torch.no_grad():
        x = torch.cat([rms(emb, W["enorm.weight"]), rms(hh, W["hnorm.weight"])], -1) @ W["eh_proj.weight"].T
        pos = torch.arange(S)[None]
        cos_sin = DeepseekV3RotaryEmbedding(config)(x, pos)
        mask = torch.full((S, S), float("-inf")).triu(1)[None, None]
        out = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
        out = out[0] if isinstance(out, tuple) else out
        logits = rms(out, W["shared_head.norm.weight"]) @ W["shared_head.head.weight"].T
    if return_hidden:
        return logits.numpy(), out.numpy()
    return logits.numpy()
