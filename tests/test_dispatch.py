"""Routed-expert dispatch: the "segment", "ragged_dot" and "dense" implementations agree in value and in
gradient (x, routing weights, the three expert weight stacks)."""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe.kernels import dispatch

D, F = 8, 4  # small model and expert widths


def _distinct(rng, M, K, choices):
    return np.stack([rng.choice(choices, K, replace=False) for _ in range(M)]).astype(np.int32)


def _case(name):
    """-> (experts [M, K], E, tile). Cases of equal (M, K, E, tile) share one compilation."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))  # stable across processes
    if name == "ragged_tiles":        # M*K = 39, not a multiple of the tile (4)
        return _distinct(rng, 13, 3, np.arange(4)), 4, 4
    if name == "ragged_tiles_empty":  # expert 2 gets nothing
        return _distinct(rng, 13, 3, np.array([0, 1, 3])), 4, 4
    if name == "k1_random":           # K = 1, default tile (clipped to 2 here)
        return rng.integers(0, 6, size=(10, 1)).astype(np.int32), 6, 64
    if name == "k1_one_expert":       # all tokens on one expert, the others empty
        return np.full((10, 1), 5, np.int32), 6, 64
    if name == "k1_two_of_six":       # zero-sized groups between used ones
        return rng.choice([1, 4], size=(10, 1)).astype(np.int32), 6, 64
    if name == "k8_e256":             # K = 8 of 256 experts (tile clipped to 2), many groups empty
        return _distinct(rng, 64, 8, np.arange(256)), 256, 64
    if name == "k8_e256_few":         # the same on 20 spread-out experts: partial tiles, 236 empty groups
        return _distinct(rng, 64, 8, np.arange(0, 256, 13)), 256, 64
    raise KeyError(name)


CASES = ["ragged_tiles", "ragged_tiles_empty", "k1_random", "k1_one_expert", "k1_two_of_six", "k8_e256",
         "k8_e256_few"]


@functools.partial(jax.jit, static_argnums=(3, 4))
def _all_impls(experts, args, ct, tile, impls):
    """(value, grads) of sum(y * ct) for each impl; grads w.r.t. x, weights, w_gate, w_up, w_down."""
    out = {}
    for impl in impls:
        def loss(*a, impl=impl):
            y = dispatch.experts_swiglu(a[0], a[1], experts, a[2], a[3], a[4], impl, tile)
            return jnp.sum(y * ct), y
        (_, y), g = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(*args)
        out[impl] = (y,) + g
    return out


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


@pytest.mark.parametrize("name", CASES)
def test_impls_agree_forward_and_grad(name):
    experts, E, tile = _case(name)
    M, K = experts.shape
    rng = np.random.default_rng(0)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    args = (f32(rng.standard_normal((M, D))), f32(rng.random((M, K))),
            f32(0.4 * rng.standard_normal((E, D, F))), f32(0.4 * rng.standard_normal((E, D, F))),
            f32(0.4 * rng.standard_normal((E, F, D))))
    ct = f32(rng.standard_normal((M, D)))
    out = jax.device_get(_all_impls(jnp.asarray(experts), args, ct, tile, dispatch.IMPLS))
    # the dense reference, computed independently in float64
    x, w, wg, wu, wd = (np.asarray(a, np.float64) for a in args)
    g, u = np.einsum("md,mkdf->mkf", x, wg[experts]), np.einsum("md,mkdf->mkf", x, wu[experts])
    y_np = np.einsum("mk,mkf,mkfd->md", w, g / (1 + np.exp(-g)) * u, wd[experts])
    labels = ("y", "dx", "dweights", "dw_gate", "dw_up", "dw_down")
    for impl in dispatch.IMPLS:
        assert _rel(out[impl][0], y_np) <= 1e-5, impl
        for lab, a, b in zip(labels, out[impl], out["dense"]):
            assert a.shape == b.shape and _rel(a, b) <= 1e-5, (impl, lab, _rel(a, b))
        unused = np.setdiff1d(np.arange(E), experts)
        for a in out[impl][3:]:  # experts nobody was routed to get exactly zero gradient
            assert not np.asarray(a)[unused].any(), impl
    assert np.abs(out["dense"][0]).max() > 0.1 and np.abs(out["dense"][2]).max() > 0.1  # not vacuous


def test_config_accepts_exactly_the_dispatch_impls():
    from jaxmoe.config import MOE_IMPLS

    assert MOE_IMPLS == ("auto",) + dispatch.IMPLS


def test_unknown_impl_raises():
    x = jnp.zeros((2, D))
    w = jnp.zeros((1, D, F))
    with pytest.raises(ValueError, match="nope"):
        dispatch.experts_swiglu(x, jnp.ones((2, 1)), jnp.zeros((2, 1), jnp.int32), w, w,
                                jnp.zeros((1, F, D)), "nope")

