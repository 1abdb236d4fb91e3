"""Pallas kernels (jaxmoe/kernels) in interpret mode on the CPU against their plain-jnp references, forward
and gradient, on fuzzed sizes: zero-sized groups, every token on one expert, T not a multiple of the block,
K=1 and K=8, E=256 in 8 groups. "gpu" runs the Pallas-Triton bodies under the generic interpreter, "tpu"
the Mosaic bodies (DMAs, SMEM) and megablox under the TPU interpreter.
"""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmoe
import reference as spec  # tests/reference.py: float64 functions written from dsv3-spec
from jaxmoe.kernels import dispatch, segment
from jaxmoe.kernels.gmm import ops as gmm_ops
from jaxmoe.kernels.gmm import reference as gmm_ref
from jaxmoe.kernels.permute import ops as perm_ops
from jaxmoe.kernels.permute import reference as perm_ref
from jaxmoe.kernels.router import ops as router_ops
from jaxmoe.kernels.router import reference as router_ref
from jaxmoe.layers.router import route as core_route


FAST_COMPILE = {"xla_backend_optimization_level": 0}  # compile time dominates these tiny cases


def _jit(fn=None, **kw):
    if fn is None:
        return functools.partial(_jit, **kw)
    return jax.jit(fn, compiler_options=FAST_COMPILE, **kw)


def _rng(name):
    return np.random.default_rng(zlib.crc32(name.encode()))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# ------------------------------------------------------------------------------------------------ router
ROUTER_CASES = {  # name: (T, E, n_group, topk_group, K, topk_method, scoring, norm)
    "v3_e256_g8": (37, 256, 8, 4, 8, "noaux_tc", "sigmoid", True),
    "v3_small_k1": (9, 8, 2, 1, 1, "noaux_tc", "sigmoid", True),
    "v2_group_max_softmax": (21, 16, 4, 2, 3, "group_limited_greedy", "softmax", False),
    "greedy_softmax_e6": (13, 6, 1, 1, 2, "greedy", "softmax", True),
}


def _router_inputs(name, T, E):
    """[2T, E] logits: T random rows, then T coarse rows (many exact ties in the scores, the group scores
    and the top-k cut); a coarse bias (ties survive it among experts of equal bias)."""
    rng = _rng(name)
    logits = np.concatenate([2 * rng.standard_normal((T, E)), rng.integers(-1, 2, size=(T, E))])
    return logits.astype(np.float32), (0.25 * rng.integers(-1, 2, size=E)).astype(np.float32)


@_jit(static_argnums=(2, 3, 4))
def _router_both(logits, bias, cfg, platform, with_grad):
    spec = router_ref.RouterSpec.from_config(cfg)
    b = bias if cfg.has_router_bias else None
    ct = jnp.sin(jnp.arange(cfg.num_experts_per_tok, dtype=jnp.float32) + 1.0)

    def ours(lg):
        w, ids, s = router_ops.route(lg, b, spec, platform=platform, interpret=True)
        return (w * ct).sum() + (s * s).sum(), (w, ids, s)

    def core(lg):
        r = core_route(lg, b, cfg)
        return (r.weights * ct).sum() + (r.scores * r.scores).sum(), (r.weights, r.experts, r.scores)

    if not with_grad:
        return ours(logits)[1], core(logits)[1], None, None
    (_, o), go = jax.value_and_grad(ours, has_aux=True)(logits)
    (_, c), gc = jax.value_and_grad(core, has_aux=True)(logits)
    return o, c, go, gc


@pytest.mark.parametrize("name", list(ROUTER_CASES))
def test_router_matches_core_router(name):
    """Random logits and a bias, then coarse logits full of exact ties (zero bias), in one call."""
    T, E, G, tg, K, method, scoring, norm = ROUTER_CASES[name]
    cfg = jaxmoe.tiny(n_routed_experts=E, n_group=G, topk_group=tg, num_experts_per_tok=K, topk_method=method,
                      scoring_func=scoring, norm_topk_prob=norm, routed_scaling_factor=2.5)
    logits, bias = _router_inputs(name, T, E)
    (w, ids, s), (wc, idc, sc), g, gc = _router_both(jnp.asarray(logits), jnp.asarray(bias), cfg, "gpu", True)
    np.testing.assert_array_equal(ids, idc)  # the same experts, ties included
    np.testing.assert_allclose(w, wc, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(s, sc, rtol=1e-6, atol=1e-7)
    ref = router_ref.route(jnp.asarray(logits), jnp.asarray(bias) if cfg.has_router_bias else None,
                           router_ref.RouterSpec.from_config(cfg))
    np.testing.assert_array_equal(ref[1], idc)
    assert (ids[T:, :, None] == ids[T:, None, :]).sum() == ids[T:].size  # distinct experts in tie rows
    assert _rel(g, gc) <= 1e-5 and np.abs(gc).max() > 1e-3


def test_router_tpu_body_matches():
    T, E, G, tg, K, method, scoring, norm = ROUTER_CASES["v3_e256_g8"]
    cfg = jaxmoe.tiny(n_routed_experts=E, n_group=G, topk_group=tg, num_experts_per_tok=K)
    logits, bias = _router_inputs("tpu", T, E)
    (w, ids, s), (wc, idc, sc), _, _ = _router_both(jnp.asarray(logits), jnp.asarray(bias), cfg, "tpu", False)
    np.testing.assert_array_equal(ids, idc)
    np.testing.assert_allclose(w, wc, rtol=1e-6, atol=1e-7)


MASK_CASES = {"e6_g3": (19, 6, 3, 2, 3), "v3_e256_g8": (21, 256, 8, 4, 8)}  # name: (T, E, n_group, topk_group, K)


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
@pytest.mark.parametrize("name", list(MASK_CASES))
def test_router_group_mask_is_minus_inf(name, platform):
    """dsv3-spec §9.5: dropped groups are masked with -inf (official), not 0.0 (HF, old remote code). Every
    biased score s + b lies in (-3, -1), so 0.0-masking would pick experts of the dropped groups."""
    T, E, G, tg, K = MASK_CASES[name]
    cfg = jaxmoe.tiny(n_routed_experts=E, n_group=G, topk_group=tg, num_experts_per_tok=K, topk_method="noaux_tc",
                      scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5)
    rng = _rng("mask_" + name)
    logits = rng.standard_normal((T, E)).astype(np.float32)
    bias = (-2.0 - rng.random(E)).astype(np.float32)
    (w, ids, s), (wc, idc, sc), g, gc = _router_both(jnp.asarray(logits), jnp.asarray(bias), cfg, platform, True)
    kw = dict(score_func="sigmoid", n_group=G, topk_group=tg, top_k=K, group_score="top2_sum", norm_topk_prob=True,
              route_scale=2.5)
    w_ref, id_ref = spec.router_ref(logits, np.eye(E), bias, **kw)  # official: mask_value -inf
    _, id_zero = spec.router_ref(logits, np.eye(E), bias, mask_value=0.0, **kw)
    assert (id_zero != id_ref).any(-1).all()  # 0.0-masking would choose other experts for every token
    order = np.argsort(ids, axis=-1)  # the spec reference sorts ids ascending per token
    np.testing.assert_array_equal(np.take_along_axis(ids, order, -1), id_ref)
    np.testing.assert_allclose(np.take_along_axis(w, order, -1), w_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(ids, idc)
    np.testing.assert_allclose(w, wc, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(s, sc, rtol=1e-6, atol=1e-7)
    assert _rel(g, gc) <= 1e-5 and np.abs(gc).max() > 1e-3


def test_router_spec_rejects_impossible_k():
    with pytest.raises(ValueError, match="top_k"):
        router_ref.RouterSpec(num_experts=8, top_k=5, n_group=4, topk_group=2)


# ------------------------------------------------------------------------------------------ permute plans
def _experts(name, T, K, E):
    rng = _rng(name)
    if name == "one_expert":
        return np.full((T, K), 3, np.int32) if K == 1 else np.stack(
            [np.r_[3, rng.choice(np.r_[0:3, 4:E], K - 1, replace=False)] for _ in range(T)]).astype(np.int32)
    if name == "empty_groups":  # only experts 1 and E-2 (and neighbours for K>1) get rows
        pool = np.array([1, E - 2] + list(range(E // 2, E // 2 + K)))
        return np.stack([rng.choice(pool, K, replace=False) for _ in range(T)]).astype(np.int32)
    return np.stack([rng.choice(E, K, replace=False) for _ in range(T)]).astype(np.int32)


PERM_CASES = [("random", 13, 1, 6), ("one_expert", 10, 1, 6), ("empty_groups", 11, 3, 8),
              ("random", 9, 8, 16), ("one_expert", 7, 8, 12)]  # (name, T, K, E)


@_jit(static_argnums=(6, 7, 8))
def _perm_all(x, w, ys, ct, experts, keep, E, align, platform):
    plan = perm_ops.make_plan(experts, E, align=align, row_multiple=8, keep=keep)
    K = experts.shape[1]
    kw = dict(platform=platform, interpret=True)

    def ours(x, w, ys):
        xs = perm_ops.permute(x, plan, **kw)
        return (perm_ops.combine(ys, w, plan, **kw) * ct).sum() + (xs * ys).sum(), xs

    def ref(x, w, ys):
        xs = perm_ref.gather_rows(x, perm_ops.row_token(plan, K))
        return (perm_ref.combine(ys, plan.pos, w * plan.keep) * ct).sum() + (xs * ys).sum(), xs

    (lo, xo), go = jax.value_and_grad(ours, argnums=(0, 1, 2), has_aux=True)(x, w, ys)
    (lr, xr), gr = jax.value_and_grad(ref, argnums=(0, 1, 2), has_aux=True)(x, w, ys)
    return plan, (lo, xo) + go, (lr, xr) + gr


PERM_PARAMS = ([(c, drop, "gpu") for c in PERM_CASES for drop in (False, True)]
               # the TPU interpreter is slow: two K=8 cases for the Mosaic bodies
               + [(PERM_CASES[3], False, "tpu"), (PERM_CASES[4], True, "tpu")])


@pytest.mark.parametrize("case,drop,platform", PERM_PARAMS, ids=[
    f"{c[0]}-T{c[1]}-K{c[2]}-E{c[3]}-{'capacity' if d else 'dropless'}-{p}" for c, d, p in PERM_PARAMS])
def test_permute_combine_match_reference(case, drop, platform):
    """Forward and VJP (x, weights, sorted rows) of permute + combine; drop: a capacity mask."""
    name, T, K, E = case
    rng = _rng(name + "x")
    experts = _experts(name, T, K, E)
    keep = rng.random((T, K)) > 0.3 if drop else np.ones((T, K), bool)
    align = 4 if name == "random" else 1
    D = 16
    x, w, ct = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((T, D), (T, K), (T, D)))
    R = -(-(T * K + E * (align - 1)) // 8) * 8
    ys = jnp.asarray(rng.standard_normal((R, D)), jnp.float32)
    plan, ours, ref = _perm_all(x, w, ys, ct, jnp.asarray(experts), jnp.asarray(keep), E, align, platform)
    for a, b, lab in zip(ours, ref, ("loss", "xs", "dx", "dw", "dys")):
        assert _rel(a, b) <= 1e-5, lab
    # the plan: every kept pair has its own row inside its expert's block, padding rows hold no pair
    pos, rp = np.asarray(plan.pos), np.asarray(plan.row_pair)
    kept = keep
    assert len(np.unique(pos[kept])) == kept.sum()
    np.testing.assert_array_equal(rp[pos[kept]], np.flatnonzero(kept.reshape(-1)))
    sizes = np.bincount(experts[kept], minlength=E)
    np.testing.assert_array_equal(plan.group_sizes, sizes)
    assert (np.asarray(plan.group_rows) % align == 0).all() and (rp >= 0).sum() == kept.sum()
    if drop:
        assert (pos[~kept] == R - 1).all() and rp[R - 1] == -1


# --------------------------------------------------------------------------------------- grouped matmul
GMM_CASES = {  # name: group sizes (before padding to the row tile)
    "ragged": [3, 0, 17, 8, 1],
    "one_group": [0, 0, 29, 0],
    "all_empty_but_last": [0, 0, 0, 0, 0, 0, 5],
    "many_groups": list(np.random.default_rng(3).integers(0, 4, 24)),
}


@_jit(static_argnums=(4, 5, 6))
def _gmm_all(lhs, rhs, rows, ct, transpose_rhs, block, platform):
    kw = dict(block=block, platform=platform, interpret=True)

    def ours(l, r):
        y = gmm_ops.gmm(l, r, rows, transpose_rhs=transpose_rhs, **kw)
        return (y * ct).sum(), y

    def ref(l, r):
        y = gmm_ref.gmm(l, r, rows, transpose_rhs=transpose_rhs)
        return (y * ct).sum(), y

    (_, yo), go = jax.value_and_grad(ours, argnums=(0, 1), has_aux=True)(lhs, rhs)
    (_, yr), gr = jax.value_and_grad(ref, argnums=(0, 1), has_aux=True)(lhs, rhs)
    to = gmm_ops.tgmm(lhs, ct, rows, **kw) if not transpose_rhs else None
    tr = gmm_ref.tgmm(lhs, ct, rows) if not transpose_rhs else None
    return (yo,) + go + (to,), (yr,) + gr + (tr,)


GMM_PARAMS = ([(n, t, "gpu") for n in GMM_CASES for t in (False, True)]
              + [("ragged", False, "tpu"), ("all_empty_but_last", True, "tpu")])  # megablox, interpreted


@pytest.mark.parametrize("name,transpose_rhs,platform", GMM_PARAMS,
                         ids=[f"{n}-{'transposed' if t else 'plain'}-{p}" for n, t, p in GMM_PARAMS])
def test_gmm_matches_reference(name, transpose_rhs, platform):
    sizes = np.asarray(GMM_CASES[name])
    bm, Kd, N = 8, 16, 24
    align = bm if platform == "gpu" else 1
    rows = -(-sizes // align) * align
    R = -(-(rows.sum() + 3) // bm) * bm  # some trailing padding rows too
    rng = _rng(name)
    lhs = np.zeros((R, Kd), np.float32)
    r0 = 0
    for s, rr in zip(sizes, rows):
        lhs[r0:r0 + s] = rng.standard_normal((s, Kd))
        r0 += rr
    rhs = rng.standard_normal((len(sizes), N, Kd) if transpose_rhs else (len(sizes), Kd, N)).astype(np.float32)
    ct = jnp.asarray(rng.standard_normal((R, N)), jnp.float32)
    block = gmm_ops.BlockSizes(bm, 8, 8)
    ours, ref = _gmm_all(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(rows, jnp.int32), ct, transpose_rhs,
                         block, platform)
    for a, b, lab in zip(ours, ref, ("y", "dlhs", "drhs", "tgmm")):
        if b is not None:
            assert a.shape == b.shape and _rel(a, b) <= 1e-5, lab
    empty = np.flatnonzero(sizes == 0)
    assert not np.asarray(ours[2])[empty].any()  # empty groups: exactly zero weight gradient


def test_gmm_gpu_rejects_tiny_triton_tiles():
    x = jnp.zeros((16, 8))
    with pytest.raises(ValueError, match=">= 16"):
        gmm_ops.gmm(x, jnp.zeros((2, 8, 8)), jnp.asarray([8, 8]), block=gmm_ops.BlockSizes(16, 8, 8),
                    platform="gpu", interpret=False)


# ------------------------------------------------------------------------------------- CPU segment path
def test_buckets_and_padding_bound():
    assert segment.buckets(64) == (8, 16, 24, 32, 40, 48, 56, 64)
    assert segment.buckets(4) == (4,)
    b = segment.buckets(512)
    assert b[-1] == 512 and all(x < y for x, y in zip(b, b[1:]))
    # padding below one bucket step per expert: step <= max(8, size / 8)
    rng = np.random.default_rng(0)
    experts = jnp.asarray(np.stack([rng.choice(256, 8, replace=False) for _ in range(512)]).astype(np.int32))
    rows = int(_jit(segment.executed_rows, static_argnums=1)(experts, 256))
    sizes = np.bincount(np.asarray(experts).ravel(), minlength=256)
    assert 512 * 8 <= rows <= 512 * 8 + sum(max(8, s // 8) for s in sizes if s)


@pytest.mark.parametrize("impl", ["segment", "pallas", "ragged_dot"])
def test_capacity_mode_same_results_and_count(impl):
    rng = _rng("capacity")
    M, K, E, D, F = 24, 2, 4, 8, 4
    experts = np.stack([rng.choice([0, 0, 0, 1, 2, 3], K, replace=False) for _ in range(M)]).astype(np.int32)
    experts[:, 0] = 0  # expert 0 is over capacity
    keep, dropped = dispatch.capacity_keep(jnp.asarray(experts), E, 1.0)
    cap = int(np.ceil(M * K / E))
    # each expert keeps its first `cap` pairs in token order
    for e in range(E):
        mask = (experts == e).reshape(-1)
        want = np.cumsum(mask) <= cap
        np.testing.assert_array_equal(np.asarray(keep).reshape(-1)[mask], want[mask])
    over = sum(max(0, c - cap) for c in np.bincount(experts.ravel(), minlength=E))
    assert int(dropped) == int((~np.asarray(keep)).sum()) == over > 0
    args = [jnp.asarray(a, jnp.float32) for a in (rng.standard_normal((M, D)), rng.random((M, K)),
                                                  rng.standard_normal((E, D, F)), rng.standard_normal((E, D, F)),
                                                  rng.standard_normal((E, F, D)))]

    def f(impl, *a):
        return (dispatch.experts_swiglu(a[0], a[1], jnp.asarray(experts), *a[2:], impl, keep=keep) ** 2).sum()

    got = _jit(jax.value_and_grad(functools.partial(f, impl), argnums=(0, 1, 2, 3, 4)))(*args)
    want = _jit(jax.value_and_grad(functools.partial(f, "dense"), argnums=(0, 1, 2, 3, 4)))(*args)
    assert _rel(got[0], want[0]) <= 1e-5
    for a, b in zip(got[1], want[1]):
        assert _rel(a, b) <= 1e-5
    assert not np.asarray(got[1][1])[~np.asarray(keep)].any()  # dropped pairs: no weight gradient


def test_pallas_row_tile_tracks_rows_per_expert():
    # GPU: about a quarter of the mean rows per expert (padding ~1/8), within Triton's [16, 64]
    assert [dispatch.pallas_row_tile(n * 256, 256) for n in (8, 64, 128, 256, 4096)] == [16, 16, 32, 64, 64]
    assert dispatch.pallas_row_tile(64, 16, interpret=True) == 8
    assert dispatch.pallas_row_tile(64 * 256, 256, "tpu") == 128  # megablox: no per-expert padding
