"""Fused router: the Pallas kernel's launch in a `jax.custom_vjp` (cached per spec, platform, interpret
and block sizes; no jit of its own: it is traced inside the caller's).

    w, ids, scores = route(logits, bias, spec)   # [T, K] f32, [T, K] int32, [T, E] f32

The choice of experts is discrete, so the backward pass differentiates only the weights and the scores
for the chosen ids (`reference.weights_from_ids`, plain jnp): d logits flows through the sigmoid/softmax,
the renormalisation and the scale; the selection bias gets a zero gradient, as in the core router.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from jaxmoe.kernels import common
from jaxmoe.kernels.router import reference
from jaxmoe.kernels.router.kernel import BlockSizes, router_kernel
from jaxmoe.kernels.router.reference import RouterSpec


def _forward(logits, bias, spec: RouterSpec, platform: str, interpret: bool, block: BlockSizes | None):
    T, E = logits.shape
    K = spec.top_k
    Ep = common.next_pow2(E) if platform == "gpu" else common.round_up(E, 128)
    Kp = common.next_pow2(K) if platform == "gpu" else K
    block = block or BlockSizes.get_default(platform, T, Ep)
    bt = block.block_t
    Tp = common.round_up(max(T, 1), bt)
    x = jnp.pad(logits.astype(jnp.float32), ((0, Tp - T), (0, Ep - E)))  # [Tp, Ep]
    has_bias = bias is not None
    b = jnp.zeros((1, Ep), jnp.float32)
    if has_bias:
        b = b.at[0, :E].set(bias.astype(jnp.float32))
    lane = np.full((1, Ep), -1.0, np.float32)
    lane[0, :E] = np.arange(E)
    gid = np.full((1, Ep), -1.0, np.float32)
    gid[0, :E] = np.arange(E) // (E // spec.n_group)
    kcol = np.arange(Kp, dtype=np.float32)[None]
    row = lambda i: (0, 0)  # noqa: E731
    w, ids, scores = pl.pallas_call(
        functools.partial(router_kernel, spec=spec, has_bias=has_bias),
        grid=(Tp // bt,),
        in_specs=[pl.BlockSpec((bt, Ep), lambda i: (i, 0)), pl.BlockSpec((1, Ep), row),
                  pl.BlockSpec((1, Ep), row), pl.BlockSpec((1, Ep), row), pl.BlockSpec((1, Kp), row)],
        out_specs=[pl.BlockSpec((bt, Kp), lambda i: (i, 0)), pl.BlockSpec((bt, Kp), lambda i: (i, 0)),
                   pl.BlockSpec((bt, Ep), lambda i: (i, 0))],
        out_shape=[jax.ShapeDtypeStruct((Tp, Kp), jnp.float32), jax.ShapeDtypeStruct((Tp, Kp), jnp.int32),
                   jax.ShapeDtypeStruct((Tp, Ep), jnp.float32)],
        name="moe_router",
        **common.call_kwargs(platform, interpret, num_warps=4, num_stages=1, semantics=("parallel",)),
    )(x, b, jnp.asarray(lane), jnp.asarray(gid), jnp.asarray(kcol))
    return w[:T, :K], ids[:T, :K], scores[:T, :E]


@functools.lru_cache(maxsize=None)
def _route_fn(spec: RouterSpec, platform: str, interpret: bool, block: BlockSizes | None):
    @jax.custom_vjp
    def f(logits, bias):
        return _forward(logits, bias, spec, platform, interpret, block)

    def fwd(logits, bias):
        out = _forward(logits, bias, spec, platform, interpret, block)
        return out, (logits, bias, out[1])

    def bwd(res, cts):
        logits, bias, ids = res
        dw, _, dscores = cts
        _, vjp = jax.vjp(lambda l: reference.weights_from_ids(l, ids, spec), logits.astype(jnp.float32))
        (dl,) = vjp((dw, dscores))
        return dl.astype(logits.dtype), None if bias is None else jnp.zeros_like(bias)

    f.defvjp(fwd, bwd)
    return f


def route(logits: jax.Array, bias: jax.Array | None, spec: RouterSpec, *, block: BlockSizes | None = None,
          platform: str | None = None, interpret: bool | None = None):
    """logits [T, E] (+ selection bias [E]) -> (weights [T, K] f32, ids [T, K] int32, scores [T, E] f32).

    platform: "gpu" (Pallas Triton) or "tpu" (Mosaic); None = the default backend's (GPU body in interpret
    mode on the CPU). interpret: None = whenever the default backend is not `platform`.
    """
    platform, interpret = common.resolve(platform, interpret)
    if logits.shape[-1] != spec.num_experts:
        raise ValueError(f"logits {logits.shape} do not have num_experts={spec.num_experts} columns")
    return _route_fn(spec, platform, interpret, block)(logits, bias)
