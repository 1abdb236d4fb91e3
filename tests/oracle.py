"""The transformers oracle: tiny random DeepSeek-V3 / V2 models in PyTorch (float32, CPU).

Pure torch/numpy/transformers test support; never imports jax or jaxmoe.

Naming: "published" names are the checkpoint names that ``save_pretrained`` writes (and that the released
DeepSeek checkpoints use), e.g. ``model.layers.1.mlp.experts.3.gate_proj.weight`` [I, D]. transformers 5.x keeps
routed experts fused in memory (``experts.gate_up_proj`` [E, 2I, D], gate rows first then up rows;
``experts.down_proj`` [E, D, I]) and splits them on save. Every helper here returns published names.

Public API:
    CONFIGS                                  named tiny configs (dict of kwargs + "arch")
    make_config(name_or_kwargs, arch=None)   -> DeepseekV3Config | DeepseekV2Config (eager attention + experts)
    build_hf(name_or_kwargs, seed=0, arch=None, init_std=0.02) -> torch model (float32, eval, randomised weights)
    save_hf(model, path, max_shard_size=None) -> Path
    hf_state_dict_published(model)           -> dict[str, np.ndarray]
    hf_logits(model, tokens)                 -> np.ndarray [B, T, V] float32
    hf_loss_and_grads(model, tokens)         -> (float, dict[str, np.ndarray])
    hf_final_hidden(model, tokens)           -> np.ndarray [B, T, D] (after model.norm, the lm_head input)
    hf_layer_io(model, tokens)               -> list[dict[str, np.ndarray]], one per decoder layer
    internal_to_published(named_tensors)     -> dict (split fused experts)
"""

from __future__ import annotations

import copy
import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------------------

_BASE_V3 = dict(
    arch="v3",
    vocab_size=97,
    hidden_size=72,
    intermediate_size=40,
    moe_intermediate_size=24,
    num_hidden_layers=3,
    num_attention_heads=3,
    num_key_value_heads=3,
    n_routed_experts=6,
    num_experts_per_tok=2,
    n_group=3,
    topk_group=2,
    n_shared_experts=1,
    first_k_dense_replace=1,
    q_lora_rank=28,
    kv_lora_rank=20,
    qk_nope_head_dim=12,
    qk_rope_head_dim=8,
    v_head_dim=10,
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    max_position_embeddings=64,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    tie_word_embeddings=False,
    attention_bias=False,
    attention_dropout=0.0,
    use_cache=False,
)


def _yarn(factor, orig, mscale, mscale_all_dim, beta_fast=32, beta_slow=1, theta=10000.0):
    rp = {"rope_type": "yarn", "rope_theta": theta, "factor": factor, "original_max_position_embeddings": orig,
          "beta_fast": beta_fast, "beta_slow": beta_slow}
    if mscale is not None:
        rp["mscale"] = mscale
    if mscale_all_dim is not None:
        rp["mscale_all_dim"] = mscale_all_dim
    return rp


def _v3(**over):
    d = copy.deepcopy(_BASE_V3)
    d.update(over)
    return d


def _v2(**over):
    d = copy.deepcopy(_BASE_V3)
    d.update(arch="v2", topk_method="group_limited_greedy", norm_topk_prob=False, routed_scaling_factor=1.5,
             n_shared_experts=2)
    d.update(over)
    return d


_BENCH_NAMES = ("bench-tiny", "bench-small")


def bench_configs_path() -> Path:
    """$JAXMOE_BENCH_CONFIGS, else <repo>/../shared/bench/bench_configs.json when present, else the
    repository's copy bench/bench_configs.json (tests check the copy equals the shared file)."""
    env = os.environ.get("JAXMOE_BENCH_CONFIGS")
    if env:
        return Path(env)
    shared = SHARED_BENCH_CONFIGS
    return shared if shared.is_file() else REPO_BENCH_CONFIGS


REPO_BENCH_CONFIGS = Path(__file__).resolve().parents[1] / "bench" / "bench_configs.json"
SHARED_BENCH_CONFIGS = Path(__file__).resolve().parents[2] / "shared" / "bench" / "bench_configs.json"


class _Configs(dict):
    """dict of named configs; a missing bench config raises a clear error instead of a bare KeyError."""

    def __missing__(self, key):
        if key in _BENCH_NAMES:
            raise KeyError(f"bench config {key!r} unavailable: {bench_configs_path()} not found "
                           "(expected a shared/ folder beside the repo, or set $JAXMOE_BENCH_CONFIGS)")
        raise KeyError(f"unknown oracle config {key!r}; known: {sorted(self)}")


CONFIGS: dict[str, dict] = _Configs(
    v3=_v3(),
    v3_no_qlora=_v3(q_lora_rank=None),
    # L0 = 16 with rope dim 8: correction range low=0, high=1 -> pair 0 kept, pairs 1..3 divided by `factor`.
    v3_yarn=_v3(rope_parameters=_yarn(4.0, 16, 1.0, 1.0), max_position_embeddings=64),
    # V2-Lite style (mscale == mscale_all_dim = 0.707): cos/sin attention_factor 1, softmax scale *= m(0.707)^2.
    # L0 = 512 gives low=0, high=2 -> a fractional ramp value (0.5) at pair 1.
    v3_yarn_mscale=_v3(rope_parameters=_yarn(4.0, 512, 0.707, 0.707), max_position_embeddings=2048),
    # mscale != mscale_all_dim: HF multiplies cos AND sin by m(1.0)/m(0.707) = 1.03699 (so q_pe.k_pe by its square)
    # and the softmax scale by m(0.707)^2.
    v3_yarn_mscale_diff=_v3(rope_parameters=_yarn(4.0, 512, 1.0, 0.707), max_position_embeddings=2048),
    # No mscale keys: softmax scale untouched, cos/sin multiplied by 0.1*ln(4)+1 = 1.13863 (generic YaRN).
    v3_yarn_no_mscale=_v3(rope_parameters=_yarn(4.0, 16, None, None), max_position_embeddings=64),
    # n_shared_experts 0: transformers builds a zero-width shared MLP (weights [0, D], [D, 0]), which adds 0.
    v3_shared0_dense0=_v3(n_shared_experts=0, first_k_dense_replace=0, num_hidden_layers=2),
    v3_shared2_dense2=_v3(n_shared_experts=2, first_k_dense_replace=2, num_hidden_layers=4),
    v3_no_norm=_v3(norm_topk_prob=False),
    v2=_v2(),
    v2_greedy=_v2(topk_method="greedy", q_lora_rank=None, n_group=1, topk_group=1, routed_scaling_factor=1.0),
    # V2 under YaRN (HF DeepseekV2: complex-exponential RoPE times attention_factor, softmax scale with mscale^2).
    # Rope dim 12, L0 = 32: low=0, high=2 -> pair 1 half-ramped (0.5), pairs 2..5 divided by `factor`.
    # mscale != mscale_all_dim: cos/sin x m(6, 0.9)/m(6, 0.707) = 1.03069, softmax scale x m(6, 0.707)^2 = 1.26940.
    v2_yarn=_v2(hidden_size=60, num_attention_heads=5, num_key_value_heads=5, qk_nope_head_dim=10,
                qk_rope_head_dim=12, v_head_dim=9, rope_parameters=_yarn(6.0, 32, 0.9, 0.707),
                max_position_embeddings=192),
)


def _load_bench():
    p = bench_configs_path()
    if not p.is_file():
        return
    data = json.loads(p.read_text())
    for name, kw in data.get("configs", {}).items():
        CONFIGS[name] = {"arch": "v3", **kw}


_load_bench()


def _as_kwargs(name_or_kwargs, arch=None) -> tuple[dict, str]:
    if isinstance(name_or_kwargs, str):
        kw = copy.deepcopy(CONFIGS[name_or_kwargs])
    else:
        kw = copy.deepcopy(dict(name_or_kwargs))
    a = kw.pop("arch", None)
    arch = arch or a or "v3"
    if arch not in ("v2", "v3"):
        raise ValueError(f"arch must be 'v2' or 'v3', got {arch!r}")
    return kw, arch


def make_config(name_or_kwargs, arch=None):
    """transformers config with eager attention and the eager (per-expert loop) experts implementation."""
    from transformers import DeepseekV2Config, DeepseekV3Config

    kw, arch = _as_kwargs(name_or_kwargs, arch)
    cfg = (DeepseekV3Config if arch == "v3" else DeepseekV2Config)(**kw)
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    return cfg


# --------------------------------------------------------------------------------------------------------------
# Model construction
# --------------------------------------------------------------------------------------------------------------

_NORM_RE = re.compile(r"(layernorm|norm)\.weight$")


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0, init_std: float = 0.02) -> torch.nn.Module:
    """All params ~ N(0, init_std); RMSNorm weights 1 + 0.1*N(0,1); V3 e_score_correction_bias 0.05*N(0,1).
    Note: at init_std 0.02 attention is nearly uniform (scores ~1e-2), so RoPE/YaRN mistakes move the logits by
    only ~0.2% relative; init_std 0.05-0.1 makes attention and routing far more discriminative."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g, dtype=torch.float32)
        p.copy_(1.0 + 0.1 * r if _NORM_RE.search(name) else init_std * r)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.05 * torch.randn(b.shape, generator=g, dtype=torch.float32))
    return model


def build_hf(name_or_kwargs, seed: int = 0, arch: str | None = None, init_std: float = 0.02):
    """Build DeepseekV3ForCausalLM (or V2) in float32, eval mode, randomised weights (see ``randomize_``)."""
    from transformers import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM

    cfg = make_config(name_or_kwargs, arch)
    torch.manual_seed(seed)
    cls = DeepseekV3ForCausalLM if cfg.model_type == "deepseek_v3" else DeepseekV2ForCausalLM
    model = cls(cfg).to(torch.float32)
    randomize_(model, seed, init_std)
    return model.eval()


# --------------------------------------------------------------------------------------------------------------
# Names: fused in-memory experts <-> published per-expert tensors
# --------------------------------------------------------------------------------------------------------------

_FUSED_RE = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def internal_to_published(named: dict[str, torch.Tensor | np.ndarray]) -> dict[str, np.ndarray]:
    """Split ``experts.gate_up_proj`` [E, 2I, D] (gate rows first) and ``experts.down_proj`` [E, D, I]
    into ``experts.{e}.{gate,up,down}_proj.weight``; other names pass through. Returns float32 numpy."""
    out = {}
    for k, v in named.items():
        a = v.detach().cpu().float().numpy() if isinstance(v, torch.Tensor) else np.asarray(v, np.float32)
        m = _FUSED_RE.match(k)
        if m is None:
            out[k] = a
            continue
        pre, kind = m.groups()
        for e in range(a.shape[0]):
            if kind == "gate_up_proj":
                i = a.shape[1] // 2
                out[f"{pre}.{e}.gate_proj.weight"] = np.ascontiguousarray(a[e, :i])
                out[f"{pre}.{e}.up_proj.weight"] = np.ascontiguousarray(a[e, i:])
            else:
                out[f"{pre}.{e}.down_proj.weight"] = np.ascontiguousarray(a[e])
    return out


def _read_safetensors_dir(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def save_hf(model, path, max_shard_size=None) -> Path:
    """save_pretrained (safetensors is the only format in transformers 5.x), optionally sharded so that
    model.safetensors.index.json is written. Asserts the saved names are the published per-expert names."""
    path = Path(path)
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(path), **kw)
    saved = _read_safetensors_dir(path)
    fused = [k for k in saved if k.endswith("gate_up_proj") or k.endswith("experts.down_proj")]
    assert not fused, f"save_pretrained wrote fused expert tensors: {fused[:3]}"
    expected = set(internal_to_published(dict(model.state_dict())))
    assert set(saved) == expected, (sorted(set(saved) ^ expected))[:10]
    if max_shard_size is not None and len(list(path.glob("*.safetensors"))) > 1:
        assert (path / "model.safetensors.index.json").is_file()
    return path


def hf_state_dict_published(model) -> dict[str, np.ndarray]:
    """Every tensor under its published name, read back from a save_pretrained round trip."""
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        return _read_safetensors_dir(Path(d))


# --------------------------------------------------------------------------------------------------------------
# Forward / backward
# --------------------------------------------------------------------------------------------------------------


def _ids(tokens) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    return t[None] if t.ndim == 1 else t


@torch.no_grad()
def hf_logits(model, tokens) -> np.ndarray:
    """float32 logits [B, T, V]; plain causal attention, no padding mask, positions 0..T-1."""
    return model(input_ids=_ids(tokens)).logits.float().numpy()


@torch.no_grad()
def hf_final_hidden(model, tokens) -> np.ndarray:
    """Hidden states after the final model.norm (the lm_head input) [B, T, D]; what MTP consumes."""
    return model.model(input_ids=_ids(tokens)).last_hidden_state.float().numpy()


def hf_loss_and_grads(model, tokens) -> tuple[float, dict[str, np.ndarray]]:
    """Mean next-token CE (logits[:, :-1] vs tokens[:, 1:], mean over B*(T-1)) and d loss / d every trainable
    parameter, keyed by published names ([out, in] layout). Parameters that got no gradient (e.g. experts no
    token was routed to) get zeros. e_score_correction_bias is a buffer: not in the dict."""
    ids = _ids(tokens)
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        logits = model(input_ids=ids).logits.float()
        v = logits.shape[-1]
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, v), ids[:, 1:].reshape(-1))
        loss.backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p))
             for n, p in model.named_parameters() if p.requires_grad}
    out = internal_to_published(grads)
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), out


@torch.no_grad()
def hf_layer_io(model, tokens) -> list[dict[str, np.ndarray]]:
    """Per decoder layer, captured with forward hooks (all float32 numpy, [B, T, ...]):
    layer_in, attn_in (input_layernorm output), attn_out (self_attn output, before the residual add),
    mlp_in (post_attention_layernorm output), mlp_out (before the residual add), layer_out;
    MoE layers also: router_logits [B, T, E], topk_idx [B, T, K] int64 (sorted ascending per token) and
    topk_weights [B, T, K] (aligned with topk_idx; routed_scaling_factor already applied)."""
    ids = _ids(tokens)
    B, T = ids.shape
    recs = [dict() for _ in model.model.layers]
    hooks = []

    def np_(t):
        return t.detach().float().numpy().copy()

    for li, layer in enumerate(model.model.layers):
        r = recs[li]

        def layer_hook(mod, args, kwargs, out, r=r):
            r["layer_in"] = np_(args[0] if args else kwargs["hidden_states"])
            r["layer_out"] = np_(out[0] if isinstance(out, tuple) else out)

        def attn_hook(mod, args, kwargs, out, r=r):
            r["attn_in"] = np_(args[0] if args else kwargs["hidden_states"])
            r["attn_out"] = np_(out[0])

        def mlp_hook(mod, args, out, r=r):
            r["mlp_in"] = np_(args[0])
            r["mlp_out"] = np_(out)

        def gate_hook(mod, args, out, r=r):
            logits, w, idx = out
            order = torch.argsort(idx, dim=-1)
            r["router_logits"] = np_(logits).reshape(B, T, -1)
            r["topk_idx"] = torch.gather(idx, -1, order).numpy().reshape(B, T, -1).astype(np.int64)
            r["topk_weights"] = np_(torch.gather(w, -1, order)).reshape(B, T, -1)

        hooks.append(layer.register_forward_hook(layer_hook, with_kwargs=True))
        hooks.append(layer.self_attn.register_forward_hook(attn_hook, with_kwargs=True))
        hooks.append(layer.mlp.register_forward_hook(mlp_hook))
        if hasattr(layer.mlp, "gate"):
            hooks.append(layer.mlp.gate.register_forward_hook(gate_hook))
    try:
        model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return recs
