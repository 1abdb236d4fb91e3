"""`python -m jaxmoe.demo`: build a preset with random weights and time forward and a training
step (forward + loss + backward + AdamW) on CPU. No downloads."""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxmoe
from jaxmoe.losses import next_token_loss


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="tiny", help=f"one of {sorted(jaxmoe.PRESETS)}")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args(argv)

    cfg = jaxmoe.get_preset(args.preset)
    model = jaxmoe.DeepseekV3(cfg, rngs=nnx.Rngs(0))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"preset {args.preset}: {n_params / 1e6:.2f}M parameters, backend {jax.default_backend()}")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt = optax.adamw(args.lr, b1=0.9, b2=0.95, weight_decay=0.1)
    opt_state = opt.init(params)

    def loss_fn(p, tokens):
        out = nnx.merge(graphdef, p, rest).forward(tokens)
        return next_token_loss(out.logits, tokens)

    @jax.jit
    def step(p, s, tokens):
        loss, g = jax.value_and_grad(loss_fn)(p, tokens)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss

    # A fixed batch of a repeating byte pattern: the loss must fall fast if training works.
    rng = np.random.default_rng(0)
    pattern = rng.integers(0, cfg.vocab_size, size=17)
    tokens = jnp.asarray(np.resize(pattern, (args.batch, args.seq)), jnp.int32)
    fwd = jax.jit(lambda p, t: nnx.merge(graphdef, p, rest)(t))
    t0 = time.perf_counter()
    fwd(params, tokens).block_until_ready()
    t1 = time.perf_counter()
    fwd(params, tokens).block_until_ready()
    t2 = time.perf_counter()
    ntok = args.batch * args.seq
    print(f"forward: compile+run {t1 - t0:.2f}s, run {t2 - t1:.3f}s ({ntok / (t2 - t1):,.0f} tok/s)")
    t0 = time.perf_counter()
    for i in range(args.steps):
        params, opt_state, loss = step(params, opt_state, tokens)
        if i == 0:
            loss.block_until_ready()
            t_first = time.perf_counter() - t0
            t0 = time.perf_counter()
        if i == 0 or (i + 1) % 5 == 0:
            print(f"step {i + 1:3d}  loss {float(loss):.4f}")
    dt = (time.perf_counter() - t0) / max(args.steps - 1, 1)
    print(f"train step: first (compile) {t_first:.2f}s, then {dt * 1e3:.1f} ms/step "
          f"({ntok / dt:,.0f} tok/s)")


if __name__ == "__main__":
    main()
