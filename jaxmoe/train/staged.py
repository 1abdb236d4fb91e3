"""Staged MoE training (the usage guide's recipe), as phases over the run:

    warmup    first `warmup` of the steps: the router is frozen (its weight gets no update and
              its selection bias no aux-loss-free update) while the experts and the rest warm up
              on a fixed routing;
    joint     the next `joint`: everything trains together, with global-norm clipping;
    sparsify  the rest (~20%): everything trains, and the objective gains
              `sparsity_weight` x the mean per-token entropy of the normalised router scores
              (averaged over the routers: in [0, ln E] at any depth), which makes each token's
              routing more decisive; under
              top-p routing (ModelConfig.router_top_p) that lowers the experts per token.

The freezing is an optimizer mask: `phase_mask` zeroes the router's gradients before clipping (so
the global norm is the trainable parameters') and its updates after AdamW (so weight decay does not
move it either), from a step count kept in the optimizer state; the parameters stay bitwise
unchanged. The phase is a metric (`phase`: 0, 1, 2) and shows in the progress line by name.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxmoe.train.checkpoint import key_name

PHASES = ("warmup", "joint", "sparsify")


def boundaries(stage, total_steps: int) -> tuple[int, int]:
    """(first joint step, first sparsify step), 0-based step indices."""
    w = int(round(stage.warmup * total_steps))
    j = int(round((stage.warmup + stage.joint) * total_steps))
    return w, max(j, w)


def phase_of(step, stage, total_steps: int) -> jax.Array:
    """Phase (int32, traceable) of the update made at 0-based `step`."""
    w, j = boundaries(stage, total_steps)
    step = jnp.asarray(step)
    return jnp.where(step < w, 0, jnp.where(step < j, 1, 2)).astype(jnp.int32)


def _names(path) -> list[str]:
    return [key_name(k) for k in path]


def is_router(path) -> bool:
    return "router" in _names(path)


class MaskState(NamedTuple):
    count: jax.Array  # updates applied so far (= the 0-based step of the next one)


def phase_mask(stage, total_steps: int) -> optax.GradientTransformation:
    """Zero the router's updates during the warm-up phase (place it before clipping and after the
    optimizer: both keep their own count, which advance together)."""

    def init(params):
        del params
        return MaskState(jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        del params
        frozen = phase_of(state.count, stage, total_steps) == 0
        updates = jax.tree_util.tree_map_with_path(
            lambda p, u: jnp.where(frozen, jnp.zeros_like(u), u) if is_router(p) else u, updates)
        return updates, MaskState(state.count + 1)

    return optax.GradientTransformation(init, update)


def describe(stage, total_steps: int) -> str:
    w, j = boundaries(stage, total_steps)
    return (f"staged: warmup (router frozen) steps 1..{w}, joint {w + 1}..{j}, sparsify "
            f"{j + 1}..{total_steps} (+{stage.sparsity_weight} x router entropy)")
