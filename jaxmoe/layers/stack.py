"""A homogeneous stack of decoder layers stored with a leading [L] axis and run with lax.scan."""

from __future__ import annotations

import jax
from flax import nnx

from jaxmoe import axes
from jaxmoe.config import ModelConfig
from jaxmoe.layers.block import DecoderLayer
from jaxmoe.layers.mla import LatentCache


def make_stack(cfg: ModelConfig, n: int, moe: bool, rngs: nnx.Rngs) -> DecoderLayer:
    """n layers created under nnx.vmap: every parameter gains a leading LAYERS axis."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: axes.LAYERS})
    def create(r: nnx.Rngs) -> DecoderLayer:
        return DecoderLayer(cfg, moe, rngs=r)

    return create(rngs)


def run_stack(stack: DecoderLayer, h: jax.Array, positions, cos, sin, mask=None,
              remat: bool = False):
    """h [B, T, D] through every layer; returns (h, aux stacked [L, ...])."""
    graphdef, state = nnx.split(stack)

    def body(h, layer_state):
        layer = nnx.merge(graphdef, layer_state)
        return layer(h, positions, cos, sin, mask)

    if remat:
        body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
    return jax.lax.scan(body, h, state)


def run_stack_absorbed(stack: DecoderLayer, h: jax.Array, positions, cos, sin,
                       cache: LatentCache):
    """Absorbed attention over a stacked cache ([L, B, S, ·]); returns (h, new cache)."""
    graphdef, state = nnx.split(stack)

    def body(h, xs):
        layer_state, layer_cache = xs
        return nnx.merge(graphdef, layer_state).absorbed(h, positions, cos, sin, layer_cache)

    return jax.lax.scan(body, h, (state, cache))
