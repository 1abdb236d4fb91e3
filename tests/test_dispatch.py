"""Routed-expert dispatch: the "segment", "ragged_dot" and "dense" implementations agree in value and in
gradient (x, routing weights, the three expert weight stacks), and `tile_layout` keeps its invariants."""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe.layers import dispatch

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


def test_unknown_impl_raises():
    x = jnp.zeros((2, D))
    w = jnp.zeros((1, D, F))
    with pytest.raises(ValueError, match="nope"):
        dispatch.experts_swiglu(x, jnp.ones((2, 1)), jnp.zeros((2, 1), jnp.int32), w, w,
                                jnp.zeros((1, F, D)), "nope")


# ----------------------------------------------------------------------------------------- tile layout
_layout = jax.jit(dispatch.tile_layout, static_argnums=(1, 2))


@pytest.mark.parametrize("M,K,E,tile,choices", [
    (13, 3, 4, 4, None), (13, 3, 4, 4, [0, 3]), (10, 1, 6, 2, [5]), (16, 8, 256, 1, None),
    (16, 8, 256, 4, None), (64, 8, 32, 8, None), (7, 2, 16, 64, [2, 9, 15]), (1, 1, 1, 1, None)])
def test_tile_layout_invariants(M, K, E, tile, choices):
    rng = np.random.default_rng(M * 1000 + E)
    pool = np.arange(E) if choices is None else np.array(choices)
    experts = np.stack([rng.choice(pool, K, replace=len(pool) < K) for _ in range(M)]).astype(np.int32)
    lay = jax.device_get(_layout(jnp.asarray(experts), E, tile))
    flat = experts.reshape(-1)
    n_tiles = lay.tile_expert.shape[0]
    dest = np.asarray(lay.dest)
    sizes = np.bincount(flat, minlength=E)
    np.testing.assert_array_equal(lay.group_sizes, sizes)
    # every (token, k) pair gets its own row inside the buffer
    assert len(np.unique(dest)) == M * K and dest.min() >= 0 and dest.max() < n_tiles * tile
    # tiles hold one expert: the tile of each pair belongs to that pair's expert
    np.testing.assert_array_equal(lay.tile_expert[dest // tile], flat)
    used = (-(-sizes // tile)).sum()
    assert int(lay.n_used) == used and used <= n_tiles
    assert (dest // tile < used).all()
    starts = []
    for e in np.unique(flat):
        rows = np.sort(dest[flat == e])
        # rows of one expert are contiguous and start on a tile boundary
        np.testing.assert_array_equal(rows, rows[0] + np.arange(len(rows)))
        assert rows[0] % tile == 0
        starts.append(rows[0])
        # order inside an expert is stable (token-major), as the argsort promises
        np.testing.assert_array_equal(dest[np.flatnonzero(flat == e)], rows)
    assert starts == sorted(starts)  # experts appear in index order
    # tile_expert is non-decreasing over the used tiles and in range everywhere
    te = np.asarray(lay.tile_expert)
    assert (np.diff(te[:used]) >= 0).all() and te.min() >= 0 and te.max() < E
