"""bench_model.py's profile: one layer of each kind, jaxmoe vs transformers on the same weights,
and the routed experts alone against dense SwiGLUs of equal FLOPs and transformers' experts."""

from __future__ import annotations

from _common import Case, jit_case, run_rounds, timed
from model_cases import SLOW_REPEATS, load_hf, matmul_cases
from model_flops import xla_flops


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
        cases.append(jit_case(key, f, args, tokens=M, flops=flops, repeats=reps))

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
    from jaxmoe.kernels import dispatch
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
            c = jit_case(f"{key} {kind}", g, args, tokens=M, flops=flops * (3 if kind == "fwd+bwd" else 1))
            c.meta["xla_flops"] = xla_flops(c.meta["compiled"])
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

