"""CPU benchmark: jaxmoe DeepseekV3 vs transformers DeepseekV3ForCausalLM, identical weights.

    python bench/bench_model.py --out BENCHMARKS.md

Everything is measured in one process with the cases interleaved round by round (the machine
is shared with other jobs, so each number is the median over the rounds; compile / first-call
time is excluded and reported apart):

  * forward tokens/s (logits of the whole batch): jax.jit of the functional forward
    (`nnx.merge(graphdef, state)(tokens)`) vs transformers under torch.no_grad;
  * training step tokens/s: forward + mean next-token cross-entropy + backward + AdamW
    (optax.adamw inside one jitted step with donated params/optimizer state; torch.optim.AdamW);
  * the machine's float32 matmul rate (jitted jnp.dot and torch.mm, 2048^3) in the same rounds;
    the larger median is "the machine's f32 matmul rate" used for MFU;
  * analytic model FLOPs per token (see `model_flops`) -> achieved GFLOP/s and MFU;
  * jaxmoe with the moe_impl variants of `--impls` on `--impl-config` (default bench-small;
    "pallas" is not run by default: on the CPU it is Pallas interpret mode);
  * transformers with sdpa/eager attention x grouped_mm/eager experts; the fastest is the
    reference of the "vs transformers" column;
  * a profile (`--no-profile` skips it): per-layer jaxmoe vs transformers (attention, MoE,
    dense MLP, LM head + loss), the routed-expert dispatch against a dense SwiGLU of equal FLOPs,
    and the XLA thunk time of the jaxmoe steps attributed to jaxmoe source functions.

The weights: a transformers model (torch.manual_seed(0)) is saved with save_pretrained to a
temporary folder and loaded by `jaxmoe.load_model`, so both sides run identical weights.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import gc
import glob
import gzip
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
DEFAULT_CONFIGS = _common.CONFIGS

MARK_BEGIN = "<!-- bench_model:begin -->"
MARK_END = "<!-- bench_model:end -->"
MM_N = 2048
TORCH_THREADS = 2
HF_VARIANTS = (("sdpa", "grouped_mm"), ("sdpa", "eager"), ("eager", "grouped_mm"))
# rounds for slow or secondary cases (the default rounds apply to everything else)
SLOW_REPEATS = {"ragged_dot": 1, "dense": 1}
TRAIN_BACK_TO_BACK = 2  # train steps per case per round; the last one is timed


# ----------------------------------------------------------------------------------- timing
class Case:
    """One timed thing: `fn()` runs it once and blocks until the result is ready."""

    def __init__(self, key: str, fn, tokens: int = 0, flops: float = 0.0, repeats: int | None = None):
        self.key, self.fn, self.tokens, self.flops, self.repeats = key, fn, tokens, flops, repeats
        self.warm_s: float | None = None  # compile (jax) or first call (torch)
        self.times: list[float] = []  # wall seconds
        self.cpu: list[float] = []    # process CPU seconds (all threads), same runs
        self.meta: dict = {}
        self.back_to_back = 1  # runs in a row per round; the last one is timed

    @property
    def med(self) -> float:
        return statistics.median(self.times)

    @property
    def cpu_med(self) -> float:
        return statistics.median(self.cpu)

    @property
    def best(self) -> float:
        return min(self.times)


def run_rounds(cases: list, repeats: int, log) -> None:
    """`repeats` rounds; each round runs each case in order (interleaved): `back_to_back` times in
    a row, timing the last."""
    import gc as _gc
    for r in range(repeats):
        done = []
        for c in cases:
            if c.repeats is not None and r >= c.repeats:
                continue
            _gc.collect()
            for _ in range(c.back_to_back - 1):
                c.fn()
            c0, t0 = time.process_time(), time.perf_counter()
            c.fn()
            c.times.append(time.perf_counter() - t0)
            c.cpu.append(time.process_time() - c0)
            done.append(c)
        log(f"  round {r + 1}/{repeats}: " + ", ".join(f"{c.key}={c.times[-1]:.3f}" for c in done))


def paired(ref: "Case", c: "Case") -> tuple[float, float]:
    """Speed of c relative to ref: the median over rounds of ref_time / c_time, pairing the runs of
    the same round (both ran under the same load); wall and CPU. c's rounds are a prefix of ref's."""
    n = min(len(ref.times), len(c.times))
    w = statistics.median(ref.times[i] / c.times[i] for i in range(n))
    u = statistics.median(ref.cpu[i] / c.cpu[i] for i in range(n))
    return w, u


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# ------------------------------------------------------------------------------------ FLOPs
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


# ------------------------------------------------------------------------------- environment
def cpu_model() -> str:
    return _common.cpu_model()


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    fl = set(line.split(":", 1)[1].split())
                    return " ".join(x for x in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")
                                    if x in fl)
    except OSError:
        pass
    return "?"


def versions() -> dict:
    import flax
    import jax
    import jaxlib
    import numpy as np
    import optax
    import torch
    import transformers
    return {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "flax": flax.__version__, "optax": optax.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__}


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--", "jaxmoe"],
                               capture_output=True, text=True).stdout.strip()
        return rev + (" + uncommitted jaxmoe/ changes" if dirty else "")
    except Exception:
        return "?"


def file_sha(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:12]
    except OSError:
        return "?"


# ------------------------------------------------------------------------------------ models
def build_hf(kw: dict, folder: str) -> int:
    import torch
    import transformers
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**kw))
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def load_hf(folder: str, attn: str, experts: str, train: bool):
    import torch
    import transformers
    m = transformers.DeepseekV3ForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation=attn, experts_implementation=experts)
    got = (m.config._attn_implementation, m.config._experts_implementation)
    if got != (attn, experts):
        raise RuntimeError(f"asked transformers for {(attn, experts)}, got {got}")
    return m.train() if train else m.eval()


def hf_fwd_fn(model, tokens):
    import torch

    def fn():
        with torch.no_grad():
            return model(tokens).logits
    return fn


def hf_train_fn(model, tokens):
    import torch
    import torch.nn.functional as Fn
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    V = model.config.vocab_size

    def fn():
        opt.zero_grad(set_to_none=True)
        logits = model(tokens).logits
        loss = Fn.cross_entropy(logits[:, :-1].reshape(-1, V), tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        return loss
    return fn


def jax_forward(folder, impl):
    """(compiled forward, state, compile seconds)."""
    import jax
    import jaxmoe
    from flax import nnx
    model = jaxmoe.load_model(folder, moe_impl=impl)
    gd, state = nnx.split(model)
    return gd, state, jax.jit(lambda st, x: nnx.merge(gd, st)(x))


def jax_train(folder, impl):
    """(jitted step with donated params/opt state, params, opt_state, rest)."""
    import jax
    import jaxmoe
    import optax
    from flax import nnx
    model = jaxmoe.load_model(folder, moe_impl=impl)
    gd, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(1e-4, weight_decay=0.01)
    opt = tx.init(params)

    def loss_fn(p, rest, tok):
        logits = nnx.merge(gd, p, rest)(tok)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tok[:, 1:]).mean()

    def step(p, o, rest, tok):
        loss, g = jax.value_and_grad(loss_fn)(p, rest, tok)
        upd, o = tx.update(g, o, p)
        return optax.apply_updates(p, upd), o, loss

    return jax.jit(step, donate_argnums=(0, 1)), params, opt, rest


def jax_fwd_case(key, folder, impl, tokens, ntok, flops, repeats=None):
    import numpy as np
    _, state, fwd = jax_forward(folder, impl)
    compiled, t_c = timed(lambda: fwd.lower(state, tokens).compile())
    case = Case(key, lambda: compiled(state, tokens).block_until_ready(), ntok, flops, repeats)
    case.warm_s = t_c
    case.meta.update(compiled=compiled, logits=lambda: np.asarray(compiled(state, tokens)))
    return case


def jax_train_case(key, folder, impl, tokens, ntok, flops, repeats=None):
    step, params, opt, rest = jax_train(folder, impl)
    compiled, t_c = timed(lambda: step.lower(params, opt, rest, tokens).compile())
    box = {"p": params, "o": opt}

    def fn():
        box["p"], box["o"], loss = compiled(box["p"], box["o"], rest, tokens)
        return loss.block_until_ready()

    case = Case(key, fn, ntok, flops, repeats)
    case.warm_s = t_c
    case.meta.update(compiled=compiled)
    return case


def xla_flops(compiled) -> float | None:
    try:
        ca = compiled.cost_analysis()
        if isinstance(ca, (list, tuple)):
            ca = ca[0]
        return float(ca["flops"]) if ca and ca.get("flops") is not None else None
    except Exception:
        return None


# ----------------------------------------------------------------------------- matmul rate
def matmul_cases() -> list:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    rng = np.random.RandomState(0)
    a = rng.standard_normal((MM_N, MM_N)).astype(np.float32)
    b = rng.standard_normal((MM_N, MM_N)).astype(np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    f = jax.jit(jnp.dot).lower(ja, jb).compile()
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    out = torch.empty(MM_N, MM_N)
    fl = 2.0 * MM_N ** 3
    cj = Case("matmul:jax", lambda: f(ja, jb).block_until_ready(), 0, fl)
    ct = Case("matmul:torch", lambda: torch.mm(ta, tb, out=out), 0, fl)
    for c in (cj, ct):
        _, c.warm_s = timed(c.fn)
    return [cj, ct]


# ----------------------------------------------------------------------------- profile
def layer_state(stack, i=0):
    """graphdef and the i-th layer's state of a layer-stacked module."""
    import jax
    from flax import nnx
    gd, st = nnx.split(stack)
    return gd, jax.tree.map(lambda a: a[i], st)


def profile_layers(kw, folder, B, T, impls, repeats, log) -> list:
    """One layer of each kind, jaxmoe vs transformers, forward and forward+backward (grads of
    the input and of the layer's weights; loss = sum(y^2)/2), on the same weights."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import torch
    import jaxmoe
    from flax import nnx
    from jaxmoe.layers.rope import rope_angles
    D, V = kw["hidden_size"], kw["vocab_size"]
    M = B * T
    N, J, G = kw["num_attention_heads"], kw["qk_nope_head_dim"] + kw["qk_rope_head_dim"], kw["v_head_dim"]
    Q, C, R = kw["q_lora_rank"], kw["kv_lora_rank"], kw["qk_rope_head_dim"]
    attn_fl = 2 * M * (D * Q + Q * N * J + D * (C + R) + C * N * (kw["qk_nope_head_dim"] + G) + N * G * D) \
        + 2 * M * ((T + 1) / 2) * N * (J + G)
    E, K, F, S = kw["n_routed_experts"], kw["num_experts_per_tok"], kw["moe_intermediate_size"], kw["n_shared_experts"]
    moe_fl = 2 * M * (D * E + (K + S) * 3 * D * F)
    mlp_fl = 2 * M * 3 * D * kw["intermediate_size"]
    head_fl = 2 * M * D * V
    rng = np.random.RandomState(2)
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    xj, xt = jnp.asarray(x), torch.from_numpy(x)
    tok = rng.randint(0, V, (B, T))
    tokj, tokt = jnp.asarray(tok.astype(np.int32)), torch.from_numpy(tok.astype(np.int64))
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    cases = []

    def add_jax(key, f, args, flops, reps=None):
        fj = jax.jit(f)
        comp, t_c = timed(lambda: fj.lower(*args).compile())
        c = Case(key, lambda: jax.block_until_ready(comp(*args)), M, flops, reps)
        c.warm_s = t_c
        c.fn()
        cases.append(c)

    def add_torch(key, f, flops, reps=None):
        c = Case(key, f, M, flops, reps)
        _, c.warm_s = timed(f)
        cases.append(c)

    def fb(f):  # forward+backward w.r.t. (layer state, input)
        return lambda st, x: jax.grad(lambda s, x: 0.5 * jnp.sum(f(s, x) ** 2), argnums=(0, 1))(st, x)

    models = {i: jaxmoe.load_model(folder, moe_impl=i) for i in impls}
    m0 = models[impls[0]]
    cos, sin = rope_angles(pos, m0.cfg)
    gd_a, st_a = layer_state(m0.moe_layers)

    def attn(st, x):
        return nnx.merge(gd_a, st).attn(x, pos, cos, sin)
    add_jax("attention fwd | jaxmoe", attn, (st_a, xj), attn_fl)
    add_jax("attention fwd+bwd | jaxmoe", fb(attn), (st_a, xj), 3 * attn_fl)
    for impl in impls:
        gd_m, st_m = layer_state(models[impl].moe_layers)

        def moe(st, x, gd_m=gd_m):
            return nnx.merge(gd_m, st).ffn(x)[0]
        reps = SLOW_REPEATS.get(impl)
        add_jax(f"MoE layer fwd | jaxmoe {impl}", moe, (st_m, xj), moe_fl, reps)
        add_jax(f"MoE layer fwd+bwd | jaxmoe {impl}", fb(moe), (st_m, xj), 3 * moe_fl, reps)
    if m0.dense_layers is not None:
        gd_d, st_d = layer_state(m0.dense_layers)

        def mlp(st, x):
            return nnx.merge(gd_d, st).ffn(x)
        add_jax("dense MLP fwd | jaxmoe", mlp, (st_d, xj), mlp_fl)
        add_jax("dense MLP fwd+bwd | jaxmoe", fb(mlp), (st_d, xj), 3 * mlp_fl)
    W = m0.lm_head_DV[...]

    def head_loss(W, x):
        lg = jnp.einsum("BTD,DV->BTV", x, W)
        return optax.softmax_cross_entropy_with_integer_labels(lg[:, :-1], tokj[:, 1:]).mean()
    add_jax("LM head + CE fwd+bwd | jaxmoe", jax.grad(head_loss, argnums=(0, 1)), (W, xj), 3 * head_fl)

    # transformers, same weights
    tm = load_hf(folder, "sdpa", "grouped_mm", train=True)
    Lm = tm.model.layers[kw["first_k_dense_replace"]]
    Ld = tm.model.layers[0]
    pe = tm.model.rotary_emb(xt, torch.arange(T)[None].expand(B, T))

    def t_fwd(f):
        def g():
            with torch.no_grad():
                return f(xt)
        return g

    def t_fb(mod, f):
        def g():
            mod.zero_grad(set_to_none=True)
            xg = xt.clone().requires_grad_(True)
            (0.5 * f(xg).pow(2).sum()).backward()
            return xg.grad
        return g

    # attention_mask=None: sdpa runs with is_causal=True, as in the full model (no padding)
    t_attn = lambda x: Lm.self_attn(x, position_embeddings=pe, attention_mask=None)[0]  # noqa: E731
    add_torch("attention fwd | transformers sdpa", t_fwd(t_attn), attn_fl)
    add_torch("attention fwd+bwd | transformers sdpa", t_fb(Lm, t_attn), 3 * attn_fl)
    for ex in ("grouped_mm", "eager"):
        def t_moe(x, ex=ex):
            tm.set_experts_implementation(ex)
            return Lm.mlp(x)
        add_torch(f"MoE layer fwd | transformers {ex}", t_fwd(t_moe), moe_fl)
        add_torch(f"MoE layer fwd+bwd | transformers {ex}", t_fb(Lm, t_moe), 3 * moe_fl)
    if m0.dense_layers is not None:
        add_torch("dense MLP fwd | transformers", t_fwd(Ld.mlp), mlp_fl)
        add_torch("dense MLP fwd+bwd | transformers", t_fb(Ld, Ld.mlp), 3 * mlp_fl)

    def t_head():
        tm.zero_grad(set_to_none=True)
        xg = xt.clone().requires_grad_(True)
        lg = tm.lm_head(xg)
        torch.nn.functional.cross_entropy(lg[:, :-1].reshape(-1, V), tokt[:, 1:].reshape(-1)).backward()
        return xg.grad
    add_torch("LM head + CE fwd+bwd | transformers", t_head, 3 * head_fl)
    order = sorted(range(len(cases)), key=lambda i: cases[i].key.split(" | ")[0])
    cases = [cases[i] for i in order]
    log(f"layer profile: {len(cases)} cases")
    mm = matmul_cases()
    run_rounds(mm + cases, repeats, log)
    return cases, max(c.flops / c.med for c in mm)


def profile_dispatch(kw, folder, B, T, repeats, log) -> tuple[list, dict]:
    """The routed experts alone on M = B*T tokens (routing: the first MoE layer's router on the
    RMS-normalised token embeddings): jaxmoe's experts_swiglu (default, and its `tile` argument
    swept), the permutation alone, a dense SwiGLU of width K*F on every token (equal FLOPs), a
    dense SwiGLU of width F on the M*K pair rows with one expert's weights (what a perfect grouped
    GEMM would cost), and transformers' experts module (grouped_mm, eager)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers
    import jaxmoe
    from jaxmoe.layers import dispatch
    from jaxmoe.layers.router import route
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts
    D, F, E, K = kw["hidden_size"], kw["moe_intermediate_size"], kw["n_routed_experts"], kw["num_experts_per_tok"]
    M = B * T
    model = jaxmoe.load_model(folder)
    rng = np.random.RandomState(1)
    tok = rng.randint(0, kw["vocab_size"], (B * T,))
    ffn = model.moe_layers.ffn  # stacked [L_moe, ...]
    x = np.asarray(model.embed_VD[...])[tok].astype(np.float32)
    x = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)  # RMS-normalised, like the MoE input
    r = route(jnp.asarray(x) @ ffn.router.w_DE[...][0], None, model.cfg)
    weights, experts = r.weights, r.experts
    counts = np.bincount(np.asarray(experts).ravel(), minlength=E)
    wg, wu, wd = (jnp.asarray(np.asarray(w[...])[0]) for w in (ffn.w_gate_EDF, ffn.w_up_EDF, ffn.w_down_EFD))
    xj = jnp.asarray(x)
    fl = 2.0 * M * K * 3 * D * F
    info = {"M": M, "K": K, "E": E, "counts": (int(counts.min()), int(counts.max())), "routed_flops": fl}
    cases = []

    def add_jax(key, f, args, flops, grad=True):
        for kind, g in (("fwd", f), ("fwd+bwd", None)):
            if kind == "fwd+bwd":
                if not grad:
                    continue
                g = jax.grad(lambda *a: 0.5 * jnp.sum(f(*a) ** 2), argnums=tuple(range(len(args))))
            fj = jax.jit(g)
            comp, t_c = timed(lambda: fj.lower(*args).compile())
            c = Case(f"{key} {kind}", lambda comp=comp: jax.block_until_ready(comp(*args)), M,
                     flops * (3 if kind == "fwd+bwd" else 1))
            c.warm_s = t_c
            c.meta["xla_flops"] = xla_flops(comp)
            c.fn()
            cases.append(c)

    # jaxmoe's routed experts, default settings
    add_jax("jaxmoe segment", lambda x, wg, wu, wd: dispatch.experts_swiglu(
        x, weights, experts, wg, wu, wd, impl="segment"), (xj, wg, wu, wd), fl)
    # the permutation alone, implementation-independent: sort the (token, expert) pairs by expert,
    # gather their rows, gather them back to pair order, weighted sum over k (no matmul)
    order = jnp.argsort(experts.reshape(-1), stable=True)
    inv = jnp.argsort(order)

    def permute(x):
        xs = x[order // K]  # [M*K, D] expert-sorted rows
        return jnp.einsum("MKD,MK->MD", xs[inv].reshape(M, K, D), weights)
    add_jax("sort + gather + un-permute + combine only (no matmul)", permute, (xj,), 0.0)
    W = K * F
    dg, du = (jnp.asarray(rng.standard_normal((D, W)).astype(np.float32) * 0.02) for _ in range(2))
    dd = jnp.asarray(rng.standard_normal((W, D)).astype(np.float32) * 0.02)

    def swiglu(x, g, u, d):
        return (jax.nn.silu(x @ g) * (x @ u)) @ d
    add_jax(f"dense SwiGLU width K*F={W} on the {M} tokens (equal FLOPs)", swiglu, (xj, dg, du, dd), fl)
    xr = jnp.asarray(rng.standard_normal((M * K, D)).astype(np.float32))
    add_jax(f"dense SwiGLU width F={F} on {M * K} rows, one expert's weights (grouped-GEMM floor)",
            swiglu, (xr, wg[0], wu[0], wd[0]), fl)
    # transformers' experts module, same weights and routing (one config per implementation: the
    # module reads config._experts_implementation at call time)
    xt = torch.from_numpy(x)
    it = torch.from_numpy(np.asarray(experts)).long()
    wt = torch.from_numpy(np.asarray(weights))
    ref = None
    for ex in ("grouped_mm", "eager"):
        mod = DeepseekV3Experts(transformers.DeepseekV3Config(**kw, experts_implementation=ex))
        assert mod.config._experts_implementation == ex
        with torch.no_grad():
            mod.gate_up_proj.copy_(torch.from_numpy(np.concatenate([np.asarray(wg), np.asarray(wu)], -1)
                                                    .transpose(0, 2, 1).copy()))
            mod.down_proj.copy_(torch.from_numpy(np.asarray(wd).transpose(0, 2, 1).copy()))

        def tf(mod=mod):
            with torch.no_grad():
                return mod(xt, it, wt)

        def tfb(mod=mod):
            mod.zero_grad(set_to_none=True)
            xg = xt.clone().requires_grad_(True)
            (0.5 * mod(xg, it, wt).pow(2).sum()).backward()
            return xg.grad
        if ref is None:
            ref = tf().numpy()
        for kind, fn, f2 in (("fwd", tf, fl), ("fwd+bwd", tfb, 3 * fl)):
            c = Case(f"transformers experts {ex} {kind}", fn, M, f2)
            _, c.warm_s = timed(fn)
            cases.append(c)
    y = np.asarray(dispatch.experts_swiglu(xj, weights, experts, wg, wu, wd, impl="segment"))
    info["maxdiff"] = float(np.abs(y - ref).max())
    try:  # rows the segment loop multiplies, when the implementation reports it
        from jaxmoe.kernels import segment as seg_mod
        info["rows"] = int(seg_mod.executed_rows(experts, E))
    except Exception:
        pass
    log(f"dispatch profile: {len(cases)} cases")
    mm = matmul_cases()
    run_rounds(mm + cases, repeats, log)
    info["rate"] = max(c.flops / c.med for c in mm)
    return cases, info


# ------------------------------------------------------------------ XLA thunk attribution
def _hlo_sources(txt: str) -> dict:
    """HLO instruction name -> (opcode, innermost-first list of (file, function, line))."""
    files, funcs, locs, frames = {}, {}, {}, {}
    sec = None
    for line in txt.splitlines():
        s = line.strip()
        if s in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            sec = s
            continue
        if sec and (not s or s.startswith(("%", "ENTRY", "HloModule", "ROOT"))):
            sec = None
        if sec == "FileNames" or sec == "FunctionNames":
            i, n = s.split(" ", 1)
            (files if sec == "FileNames" else funcs)[int(i)] = n.strip('"')
        elif sec == "FileLocations":
            m = re.match(r"(\d+) \{file_name_id=(\d+) function_name_id=(\d+) line=(\d+)", s)
            if m:
                locs[int(m[1])] = (files.get(int(m[2]), "?"), funcs.get(int(m[3]), "?"), int(m[4]))
        elif sec == "StackFrames":
            m = re.match(r"(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)", s)
            if m:
                frames[int(m[1])] = (int(m[2]), int(m[3]))
    out = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$", txt, re.M):
        name, rest = m[1], m[2]
        op = re.search(r"\s([a-z][\w\-]*)\(", " " + rest)
        sf = re.search(r"stack_frame_id=(\d+)", rest)
        chain, f, seen = [], int(sf[1]) if sf else 0, set()
        while f and f in frames and f not in seen:
            seen.add(f)
            chain.append(locs.get(frames[f][0]))
            f = frames[f][1]
        out[name] = (op[1] if op else "?", chain)
    return out


COMPONENTS = (("layers/dispatch.py", "routed experts (dispatch.py)"), ("layers/mla.py", "MLA attention (mla.py)"),
              ("layers/stack.py", "layer scan carry/stacking (stack.py)"),
              ("layers/mlp.py", "dense + shared SwiGLU (mlp.py)"), ("model.py", "embedding + LM head (model.py)"),
              ("layers/norm.py", "RMSNorm"), ("layers/rope.py", "rope"), ("layers/router.py", "router"),
              ("layers/moe.py", "MoE glue + routing stats (moe.py)"), ("layers/block.py", "residuals (block.py)"))


def _component(chain) -> tuple[str, str]:
    for c in chain:
        if c and "/jaxmoe/" in c[0]:
            rel = c[0].split("/jaxmoe/")[-1]
            fn = c[1].split(".<locals>")[0]
            comp = next((n for p, n in COMPONENTS if rel.endswith(p)), rel)
            return comp, f"{rel}:{fn}"
    for c in chain:
        if c and "/optax/" in c[0]:
            return "optimizer (optax)", "optax"
    for c in chain:
        if c and "bench_model.py" in c[0]:
            return "loss (cross-entropy)", "bench_model.py:loss_fn"
    return "other", "other"


def attribute(compiled, run, n: int, log) -> dict | None:
    """Run `run()` n times under jax.profiler and add up the XLA:CPU thunk time per jaxmoe
    source component (innermost jaxmoe stack frame of each HLO instruction). Control-flow thunks
    (while/conditional) are skipped: their bodies' thunks are counted. Thunk time is summed over
    the threads that ran them, so it can exceed wall time; async thunks are undercounted."""
    import jax
    try:
        src = _hlo_sources(compiled.as_text())
        logdir = tempfile.mkdtemp(prefix="bench_trace_")
        with jax.profiler.trace(logdir, create_perfetto_trace=True):
            t0 = time.perf_counter()
            for _ in range(n):
                run()
            wall = (time.perf_counter() - t0) / n
        path = sorted(glob.glob(os.path.join(logdir, "plugins", "profile", "*", "perfetto_trace.json.gz")))[-1]
        with gzip.open(path) as f:
            ev = json.load(f)
        shutil.rmtree(logdir, ignore_errors=True)
        ev = ev["traceEvents"] if isinstance(ev, dict) else ev
        comp_t, fn_t, kind_t = collections.Counter(), collections.Counter(), collections.Counter()
        nthunks = 0
        for e in ev:
            if e.get("ph") != "X" or "hlo_op" not in e.get("args", {}):
                continue
            name = e["args"]["hlo_op"]
            opcode, chain = src.get(name, ("?", []))
            if opcode in ("while", "conditional", "call") or re.match(r"(while|cond|conditional|call)(\.\d+)?$", name):
                continue
            comp, fn = _component(chain)
            dur = e["dur"] / 1e3 / n  # ms per step
            comp_t[comp] += dur
            fn_t[fn] += dur
            is_mm = name.startswith(("ynn_fusion", "xnn_fusion", "dot", "onednn")) or opcode in ("dot", "custom-call")
            kind_t["matmul" if is_mm else "other (elementwise, copies, gathers, ...)"] += dur
            nthunks += 1
        return {"wall_ms": wall * 1e3, "components": comp_t.most_common(), "functions": fn_t.most_common(12),
                "kinds": kind_t.most_common(), "thunks_per_step": nthunks / n}
    except Exception as e:
        log(f"  trace attribution failed: {e!r}")
        return None


# --------------------------------------------------------------------------------- report
def fmt(x, nd=1):
    return f"{x:,.{nd}f}"


def render(res: dict) -> str:
    L = [MARK_BEGIN, "## Model benchmark: jaxmoe vs transformers on CPU (float32)\n"]
    env = res["env"]
    L.append(f"Command (repository root): `{res['command']}` — {res['elapsed_min']:.1f} min.\n")
    L.append(f"- Date: {res['date']}; jaxmoe git {env['git']} (dispatch.py sha256 {env['dispatch_sha']})")
    L.append(f"- Machine: {env['nproc']} CPU cores (nproc), {env['cpu']} ({env['flags']}), "
             f"{env['mem_gb']} GB RAM; shared with other jobs: load average {env['load_start']} at "
             f"start, {env['load_end']} at end (1/5/15 min). Absolute numbers vary with that load; "
             "the comparison is interleaved, so ratios are more stable than rates.")
    L.append("- Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    L.append(f"- Threads: torch.set_num_threads({TORCH_THREADS}), OMP_WAIT_POLICY={env['omp']} "
             "(with the default busy-waiting OpenMP, 2-thread torch on this shared 2-core machine ran "
             "3-5x slower than with passive waiting); XLA:CPU default thread pool (2 cores).")
    L.append(f"- Batch {res['batch']} x seq {res['seq']} = {res['batch'] * res['seq']} tokens per step. Each "
             f"case is warmed up (compile / first call reported apart) and timed in up to {res['repeats']} "
             "interleaved rounds (jaxmoe ragged_dot and dense: 1 round; the profile: "
             f"{res['profile_repeats']} rounds); in each round a train step runs {TRAIN_BACK_TO_BACK} "
             "times in a row and the last is timed (training steps follow each other; the first "
             "XLA step after torch steps pays for re-faulting its buffers). "
             "Time = median wall seconds (best in brackets); CPU = median process CPU seconds (all "
             "threads) of the same runs, which the other jobs disturb much less than wall time; "
             "cores = CPU / wall (at most 2; below 2 when the step leaves a core idle or the other "
             "jobs take it).")
    mm = res["matmul"]
    L.append(f"- f32 matmul rate ({MM_N}^3, in the same rounds): jax.jit(jnp.dot) {fmt(mm['jax'])} GFLOP/s "
             f"({mm['jax_cores']:.2f} cores), torch.mm {fmt(mm['torch'])} GFLOP/s ({mm['torch_cores']:.2f} cores); "
             f"**machine f32 matmul rate = {fmt(mm['rate'])} GFLOP/s** (the larger; best single runs "
             f"{fmt(mm['jax_best'])} / {fmt(mm['torch_best'])}). MFU = achieved model GFLOP/s (median "
             "wall) / that rate. The rate is measured under the same load as the steps, so it drops "
             "with the load; divide MFU by best/median of the matmul rate for a figure against "
             "the best single matmul run (cases that ran in a quieter moment can exceed 100%).")
    L.append("- Model FLOPs (analytic; `model_flops` in the script): forward = 2 x (weights each token "
             "is multiplied through: MLA q_a/q_b/kv_a/kv_b/o projections, router, K routed + shared "
             "experts or the dense SwiGLU, LM head) + attention, per token per layer, "
             "2*S*N*(qk_nope+qk_rope) for QK^T and 2*S*N*v_head_dim for PV with S = (T+1)/2 (the "
             "causal half). jaxmoe computes the full T x T score square (2x that term); transformers' "
             "sdpa runs is_causal. Training = 3 x forward. Norms, softmax, rope and the optimizer are "
             "not counted.")
    L.append(f"- transformers default implementations: attention {res['hf_default'][0]!r}, experts "
             f"{res['hf_default'][1]!r}. Measured variants: attention sdpa/eager x experts "
             "grouped_mm/eager (eager/eager skipped); the fastest median is the reference. "
             "`batched_mm` experts were 57-82 s per bench-small forward in a trial (vs ~0.6 s) and are "
             "not run.\n")
    for name, cr in res["configs"].items():
        fl = cr["flops"]
        L.append(f"### {name}\n")
        L.append(f"{fmt(fl['params_excl_norms'] / 1e6, 2)}M parameters without norms (transformers "
                 f"counts {fmt(cr['hf_params'] / 1e6, 2)}M), {fmt(fl['active_matmul_params'] / 1e6, 2)}M "
                 f"active matmul parameters per token. Forward {fmt(fl['fwd'] / 1e6, 2)} MFLOP/token "
                 f"(matmuls {fmt(fl['matmul_fwd'] / 1e6, 2)}, of which routed experts "
                 f"{fmt(fl['routed_fwd'] / 1e6, 2)}; causal attention {fmt(fl['attn_fwd'] / 1e6, 2)}), "
                 f"training {fmt(fl['train'] / 1e6, 2)} MFLOP/token. Logits max |jaxmoe - "
                 f"transformers| = {cr['logits_maxdiff']:.1e}.\n")
        L.append("Speed vs transformers = median over rounds of (transformers reference time / jaxmoe "
                 "time) in the same round, wall (CPU); > 1 means jaxmoe is faster.\n")
        L.append("| step | implementation | time s | CPU s | cores | tokens/s | GFLOP/s | MFU | "
                 "speed vs transformers: wall (CPU) | compile (jax) / first call s |")
        L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for row in cr["rows"]:
            L.append(f"| {row['step']} | {row['impl']} | {row['med']:.3f} ({row['best']:.3f}) | "
                     f"{row['cpu']:.3f} | {row['cpu'] / row['med']:.2f} | "
                     f"{fmt(row['tok_s'], 0)} | {fmt(row['gflops'])} | {100 * row['mfu']:.1f}% | "
                     f"{row['ratio']} | {row['warm']:.1f} |")
        L.append("")
    p = res.get("profile")
    if p:
        L.append(f"### Profile ({p['config']})\n")
        L.append("**One layer, jaxmoe vs transformers** (same weights; input [8, 256, D] random; "
                 "fwd+bwd = grads of the input and the layer's weights of sum(y^2)/2; the MoE layer "
                 "includes router + routed + shared experts; FLOPs as in the model count; MFU against "
                 f"the f32 matmul rate re-measured in these rounds, {fmt(p['layers_rate'] / 1e9)} GFLOP/s).\n")
        L.append("| layer | implementation | time ms | CPU ms | GFLOP/s | MFU | compile / first call s |")
        L.append("|---|---|---:|---:|---:|---:|---:|")
        for c in p["layers"]:
            what, impl = c.key.split(" | ")
            L.append(f"| {what} | {impl} | {1e3 * c.med:.1f} ({1e3 * c.best:.1f}) | {1e3 * c.cpu_med:.1f} | "
                     f"{fmt(c.flops / c.med / 1e9)} | {100 * c.flops / c.med / p['layers_rate']:.1f}% | "
                     f"{c.warm_s:.2f} |")
        d = p["dispatch_info"]
        L.append(f"\n**Routed experts alone** (M = {d['M']} tokens, K = {d['K']}, E = {d['E']}; routing "
                 "= the first MoE layer's router on RMS-normalised token embeddings, tokens per "
                 f"expert {d['counts'][0]}..{d['counts'][1]}"
                 + (f"; the segment loop multiplies {d['rows']} rows for {d['M'] * d['K']} (token, "
                    "expert) pairs" if "rows" in d else "")
                 + f"). Routed forward = {fmt(d['routed_flops'] / 1e9, 2)} GFLOP, fwd+bwd 3x. "
                 f"max |jaxmoe segment - transformers experts| = {d['maxdiff']:.1e}. MFU against the f32 "
                 f"matmul rate re-measured in these rounds, {fmt(d['rate'] / 1e9)} GFLOP/s. XLA cost_analysis "
                 "counts a loop body once, so it undercounts the expert loop.\n")
        L.append("| case | time ms | CPU ms | GFLOP/s | MFU | XLA cost_analysis GFLOP | compile s |")
        L.append("|---|---:|---:|---:|---:|---:|---:|")
        for c in p["dispatch"]:
            xf = c.meta.get("xla_flops")
            g = f"{fmt(c.flops / c.med / 1e9)}" if c.flops else "-"
            mfu = f"{100 * c.flops / c.med / d['rate']:.1f}%" if c.flops else "-"
            L.append(f"| {c.key} | {1e3 * c.med:.1f} ({1e3 * c.best:.1f}) | {1e3 * c.cpu_med:.1f} | {g} | {mfu} | "
                     f"{'-' if xf is None else fmt(xf / 1e9, 2)} | {c.warm_s:.2f} |")
        for label, a in p.get("attribution", {}).items():
            if not a:
                continue
            tot = sum(v for _, v in a["components"])
            L.append(f"\n**XLA thunk time of the jaxmoe {label}** (jax.profiler trace; "
                     f"{a['wall_ms']:.0f} ms wall per step while traced, {tot:.0f} ms of thunk time "
                     f"summed over threads, {a['thunks_per_step']:.0f} thunks per step; attributed to "
                     "the innermost jaxmoe stack frame of each HLO instruction; backward ops carry the "
                     "frame of their forward op). Matmul share: "
                     + ", ".join(f"{k} {100 * v / tot:.0f}%" for k, v in a["kinds"]) + ".\n")
            L.append("| component | ms/step | share |")
            L.append("|---|---:|---:|")
            for k, v in a["components"]:
                L.append(f"| {k} | {v:.0f} | {100 * v / tot:.1f}% |")
            L.append("\nTop source functions: " + ", ".join(f"`{k}` {v:.0f} ms" for k, v in a["functions"][:8]) + ".")
        L.append("")
    L.append(MARK_END)
    return "\n".join(L)


def write_section(path: str, text: str) -> None:
    _common.write_section(path, text, MARK_BEGIN, MARK_END)


# ----------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help="bench_configs.json (default: %(default)s)")
    ap.add_argument("--names", default=None, help="comma-separated config names (default: all in the file)")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds per case (default 5)")
    ap.add_argument("--impls", default="segment,ragged_dot,dense", help="moe_impl variants for --impl-config")
    ap.add_argument("--impl-config", default="bench-small", help="config that runs every moe_impl")
    ap.add_argument("--no-profile", action="store_true", help="skip the layer / dispatch / trace profile")
    ap.add_argument("--profile-repeats", type=int, default=3, help="timed rounds of the profile (default 3)")
    ap.add_argument("--omp-wait-policy", default="PASSIVE", help="OMP_WAIT_POLICY for torch (default PASSIVE)")
    ap.add_argument("--out", default=None, help="markdown file whose bench_model section is (re)written")
    ap.add_argument("--json", default=None, help="also dump raw timings here")
    args = ap.parse_args(argv)

    # before torch / jax are imported
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.omp_wait_policy:
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy
    warnings.filterwarnings("ignore")
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(TORCH_THREADS)
    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.0f}s] {msg}", flush=True)

    with open(args.configs) as f:
        spec = json.load(f)
    B, T = int(spec["batch"]), int(spec["seq"])
    if spec.get("dtype", "float32") != "float32":
        raise SystemExit("this benchmark runs float32 only")
    names = args.names.split(",") if args.names else list(spec["configs"])
    impls = [s for s in args.impls.split(",") if s]
    ntok = B * T
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30)
    except (ValueError, OSError):
        mem_gb = "?"
    env = {"nproc": os.cpu_count(), "cpu": cpu_model(), "flags": cpu_flags(), "versions": versions(),
           "git": git_rev(), "dispatch_sha": file_sha(os.path.join(REPO, "jaxmoe", "layers", "dispatch.py")),
           "load_start": " ".join(f"{x:.1f}" for x in os.getloadavg()), "mem_gb": mem_gb,
           "omp": os.environ.get("OMP_WAIT_POLICY", "(unset)")}
    log(f"jax {jax.__version__} on {jax.devices()}; torch threads {torch.get_num_threads()}; "
        f"OMP_WAIT_POLICY={env['omp']}")
    cmd = "python bench/bench_model.py" + ("".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])))
    res = {"batch": B, "seq": T, "repeats": args.repeats, "configs": {}, "env": env, "command": cmd,
           "profile_repeats": args.profile_repeats,
           "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")}
    default_model = transformers.DeepseekV3ForCausalLM(
        transformers.DeepseekV3Config(**spec["configs"][names[0]]))
    res["hf_default"] = (default_model.config._attn_implementation, default_model.config._experts_implementation)
    del default_model

    tmp_root = tempfile.mkdtemp(prefix="bench_model_")
    folders, hf_params = {}, {}
    for name in names:
        folders[name] = os.path.join(tmp_root, name)
        hf_params[name] = build_hf(spec["configs"][name], folders[name])

    mm_cases = matmul_cases()
    rng = np.random.RandomState(0)
    for name in names:
        kw = spec["configs"][name]
        fl = model_flops(kw, T)
        tok = rng.randint(0, kw["vocab_size"], (B, T))
        tok_j, tok_t = jnp.asarray(tok.astype(np.int32)), torch.from_numpy(tok.astype(np.int64))
        folder = folders[name]
        run_impls = impls if name == args.impl_config else ["auto"]
        log(f"{name}: compiling jaxmoe ({', '.join(run_impls)})")
        jf, jt = {}, {}
        for impl in run_impls:
            reps = SLOW_REPEATS.get(impl)
            jf[impl] = jax_fwd_case(f"jax fwd {impl}", folder, impl, tok_j, ntok, fl["fwd"] * ntok, reps)
            jt[impl] = jax_train_case(f"jax train {impl}", folder, impl, tok_j, ntok, fl["train"] * ntok, reps)
            for c in (jf[impl], jt[impl]):  # compiled ahead of time: no warm-up run needed
                log(f"  {c.key}: compile {c.warm_s:.1f}s")
        hf_f, hf_t = {}, {}
        for attn, ex in HF_VARIANTS:
            reps = SLOW_REPEATS.get((attn, ex))
            v = f"{attn}/{ex}"
            hf_f[v] = Case(f"hf fwd {v}", hf_fwd_fn(load_hf(folder, attn, ex, False), tok_t), ntok,
                           fl["fwd"] * ntok, reps)
            hf_t[v] = Case(f"hf train {v}", hf_train_fn(load_hf(folder, attn, ex, True), tok_t), ntok,
                           fl["train"] * ntok, reps)
            for c in (hf_f[v], hf_t[v]):
                _, c.warm_s = timed(c.fn)
        for c in list(jt.values()) + list(hf_t.values()):
            # a training run's steps follow each other; the first XLA step after torch steps
            # (and the reverse) pays for re-faulting its buffers
            c.back_to_back = TRAIN_BACK_TO_BACK
        ref = hf_f["sdpa/grouped_mm"].fn().numpy()
        maxdiff = max(float(np.abs(jf[i].meta["logits"]() - ref).max()) for i in run_impls)
        cases = list(mm_cases) + list(jf.values()) + list(hf_f.values()) + list(jt.values()) + list(hf_t.values())
        log(f"{name}: {args.repeats} rounds")
        run_rounds(cases, args.repeats, log)
        res["configs"][name] = {"flops": fl, "hf_params": hf_params[name], "logits_maxdiff": maxdiff,
                                "jf": jf, "jt": jt, "hf_f": hf_f, "hf_t": hf_t}
        if not args.no_profile and name == args.impl_config:
            # trace attribution of the default-impl steps, while their compiled executables exist
            d0 = run_impls[0]
            log(f"{name}: tracing jaxmoe steps ({d0})")
            res.setdefault("attribution", {})
            res["attribution"][f"forward ({d0})"] = attribute(jf[d0].meta["compiled"], jf[d0].fn, 3, log)
            res["attribution"][f"train step ({d0})"] = attribute(jt[d0].meta["compiled"], jt[d0].fn, 2, log)
        for c in list(jf.values()) + list(jt.values()):
            c.meta.pop("compiled", None)
            c.meta.pop("logits", None)
        gc.collect()

    mmj, mmt = (c for c in mm_cases)
    mm = {"jax": mmj.flops / mmj.med / 1e9, "torch": mmt.flops / mmt.med / 1e9,
          "jax_best": mmj.flops / mmj.best / 1e9, "torch_best": mmt.flops / mmt.best / 1e9,
          "jax_cores": mmj.cpu_med / mmj.med, "torch_cores": mmt.cpu_med / mmt.med}
    mm["rate"] = max(mm["jax"], mm["torch"])
    res["matmul"] = mm
    rate = mm["rate"] * 1e9

    for name, cr in res["configs"].items():
        rows = []
        for step, jd, hd in (("forward", cr["jf"], cr["hf_f"]), ("train step", cr["jt"], cr["hf_t"])):
            best_hf = min(hd.values(), key=lambda c: c.med)
            for impl, c in jd.items():
                from jaxmoe.layers.moe import resolve_impl
                rw, rc = paired(best_hf, c)
                rows.append({"step": step, "impl": f"jaxmoe {resolve_impl(impl)}", "case": c,
                             "ratio": f"{rw:.2f}x ({rc:.2f}x)"})
                if step == "train step" and c is jd[next(iter(jd))]:
                    cr["train_ratio"] = (rw, rc)
                if step == "forward" and c is jd[next(iter(jd))]:
                    cr["fwd_ratio"] = (rw, rc)
            for v, c in hd.items():
                rows.append({"step": step, "impl": f"transformers {v}" + (" (reference)" if c is best_hf else ""),
                             "case": c, "ratio": ""})
        for r in rows:
            c = r.pop("case")
            r.update(med=c.med, best=c.best, cpu=c.cpu_med, tok_s=c.tokens / c.med,
                     gflops=c.flops / c.med / 1e9, mfu=c.flops / c.med / rate, warm=c.warm_s)
        cr["rows"] = rows

    if not args.no_profile:
        pname = args.impl_config if args.impl_config in names else names[-1]
        log(f"profile on {pname}: layers")
        layers, layers_rate = profile_layers(spec["configs"][pname], folders[pname], B, T, impls[:1],
                                             args.profile_repeats, log)
        log(f"profile on {pname}: routed-expert dispatch")
        disp, dinfo = profile_dispatch(spec["configs"][pname], folders[pname], B, T, args.profile_repeats, log)
        res["profile"] = {"config": pname, "layers": layers, "layers_rate": layers_rate, "dispatch": disp,
                          "dispatch_info": dinfo,
                          "attribution": res.get("attribution", {})}

    env["load_end"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    res["elapsed_min"] = (time.perf_counter() - t_start) / 60
    text = render(res)
    print("\n" + text)
    if args.out:
        write_section(args.out, text)
        log(f"wrote {args.out}")
    if args.json:
        def clean(o):
            if isinstance(o, Case):
                return {"key": o.key, "times": o.times, "cpu": o.cpu, "warm_s": o.warm_s, "tokens": o.tokens,
                        "flops": o.flops}
            if isinstance(o, dict):
                return {str(k): clean(v) for k, v in o.items()}
            if isinstance(o, (list, tuple)):
                return [clean(v) for v in o]
            return o if isinstance(o, (int, float, str, type(None), bool)) else str(o)
        with open(args.json, "w") as f:
            json.dump(clean(res), f, indent=1)
    shutil.rmtree(tmp_root, ignore_errors=True)
    log(f"done in {time.perf_counter() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
