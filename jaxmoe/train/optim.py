"""The optimizer (dsv3-spec §11): global-norm clipping, then AdamW (beta1 0.9, beta2 0.95,
weight decay 0.1 on matrices and embeddings, never on norm scales or biases), with a
warm-up + cosine schedule or the technical report's staged schedule. `moments_dtype="bfloat16"`
stores both moments in BF16, as the report does (half the optimizer memory); each update still
runs in float32 from the stored moments, and only the new moments are rounded for storage.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxmoe.train.config import OptimSection

# The report's staged LR over 14.8T tokens (dsv3-spec §11), as fractions of the run:
# constant peak until 10T, cosine to 0.1 x peak by 14.3T, 0.1 x peak until 14.633T, then
# 7.3e-6 / 2.2e-4 of peak to the end.
STAGED_CONST_END = 10.0 / 14.8
STAGED_COSINE_END = 14.3 / 14.8
STAGED_FLOOR_END = 14.633 / 14.8
STAGED_FLOOR = 0.1
STAGED_LAST = 7.3e-6 / 2.2e-4


def schedule(o: OptimSection, total_steps: int) -> optax.Schedule:
    warm = min(o.warmup_steps, max(total_steps - 1, 0))
    peak = o.lr
    if o.schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, peak, max(warm, 1)),
                                     optax.constant_schedule(peak)], [warm]) if warm else \
            optax.constant_schedule(peak)
    if o.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, peak, warm, max(total_steps, warm + 1), end_value=peak * o.min_lr_ratio)

    def staged(step):
        step = jnp.asarray(step, jnp.float32)
        n = float(max(total_steps, 1))
        c_end, cos_end, f_end = STAGED_CONST_END * n, STAGED_COSINE_END * n, STAGED_FLOOR_END * n
        warmup = peak * step / max(warm, 1)
        frac = jnp.clip((step - c_end) / max(cos_end - c_end, 1.0), 0.0, 1.0)
        cosine = peak * (STAGED_FLOOR + (1 - STAGED_FLOOR) * 0.5 * (1 + jnp.cos(jnp.pi * frac)))
        lr = jnp.where(step < c_end, peak, cosine)
        lr = jnp.where(step >= cos_end, peak * STAGED_FLOOR, lr)
        lr = jnp.where(step >= f_end, peak * STAGED_LAST, lr)
        return jnp.where(step < warm, warmup, lr)

    return staged


def _names(path) -> list[str]:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
    return out


def decays(path) -> bool:
    """Weight decay applies to every parameter except norm scales and biases."""
    names = [n for n in _names(path) if n != "value"]
    leaf = names[-1] if names else ""
    return not (leaf == "scale" or leaf.startswith("bias") or leaf.endswith("bias"))


def decay_mask(params):
    return jax.tree_util.tree_map_with_path(lambda p, _: decays(p), params)


def scale_by_adam_stored(b1: float, b2: float, eps: float, dtype) -> optax.GradientTransformation:
    """optax.scale_by_adam (bias-corrected, eps outside the root) with both moments kept in
    `dtype`: read and updated in float32, the update from the float32 values, stored rounded."""
    f32 = jnp.float32

    def init(params):
        zeros = lambda p: jnp.zeros(p.shape, dtype)  # noqa: E731
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32),
                                      mu=jax.tree.map(zeros, params), nu=jax.tree.map(zeros, params))

    def update(grads, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        mu = jax.tree.map(lambda m, g: b1 * m.astype(f32) + (1 - b1) * g.astype(f32), state.mu, grads)
        nu = jax.tree.map(lambda v, g: b2 * v.astype(f32) + (1 - b2) * jnp.square(g.astype(f32)),
                          state.nu, grads)
        c1 = 1 - b1 ** count.astype(f32)
        c2 = 1 - b2 ** count.astype(f32)
        upd = jax.tree.map(lambda m, v, g: (m / c1 / (jnp.sqrt(v / c2) + eps)).astype(g.dtype),
                           mu, nu, grads)
        store = lambda t: jax.tree.map(lambda x: x.astype(dtype), t)  # noqa: E731
        return upd, optax.ScaleByAdamState(count=count, mu=store(mu), nu=store(nu))

    return optax.GradientTransformation(init, update)


def make_optimizer(o: OptimSection, total_steps: int, stage=None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`stage`: a StageSection; when enabled, the phase mask of staged training wraps the chain
    (router gradients zeroed before clipping, its updates after AdamW, during warm-up)."""
    lr = schedule(o, total_steps)
    parts = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm > 0 else []
    if o.moments_dtype == "float32":
        parts.append(optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                                 mask=decay_mask))
    else:  # AdamW's own chain, with the moments stored in the narrower dtype
        parts.append(optax.chain(scale_by_adam_stored(o.b1, o.b2, o.eps, jnp.dtype(o.moments_dtype)),
                                 optax.add_decayed_weights(o.weight_decay, decay_mask),
                                 optax.scale_by_learning_rate(lr)))
    if stage is not None and stage.enabled:
        from jaxmoe.train.staged import phase_mask

        parts = [phase_mask(stage, total_steps), *parts, phase_mask(stage, total_steps)]
    return optax.chain(*parts), lr
