"""bench_model.py's timed cases: the transformers and jaxmoe models on identical weights (forward
and training step) and the machine's float32 matmul rate."""

from __future__ import annotations

from _common import Case, timed

MM_N = 2048
TORCH_THREADS = 2
HF_VARIANTS = (("sdpa", "grouped_mm"), ("sdpa", "eager"), ("eager", "grouped_mm"))
# rounds for slow or secondary cases (the default rounds apply to everything else)
SLOW_REPEATS = {"ragged_dot": 1, "dense": 1}
TRAIN_BACK_TO_BACK = 2  # train steps per case per round; the last one is timed


# ------------------------------------------------------------------------------ transformers
def build_hf(kw: dict, folder: str) -> int:
    """A transformers model from config kwargs (torch.manual_seed(0)) saved to folder; its
    parameter count."""
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


# ------------------------------------------------------------------------------------ jaxmoe
def jax_forward(folder, impl):
    """(graphdef, state, jitted forward of (state, tokens))."""
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

    def loss_fn(p, rest, tok):  # xla_attribution.py credits this function's ops to the loss
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


# ----------------------------------------------------------------------------- matmul rate
def matmul_cases() -> list:
    """Jitted jnp.dot and torch.mm on MM_N^3 float32, warmed up."""
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
