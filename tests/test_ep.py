"""Expert parallelism (jaxmoe.parallel.ep) on the 8 fake CPU devices: the MoE layer under `ep_scope` equals
the single-device layer, forward and gradients (x, router, routed and shared expert weights), for every
variant on ep = 2, 4, 8 sub-meshes, with rows split over the expert axis or replicated over it, a 2-axis
expert group and padded row counts; the capacity mode drops exactly the pairs a plain-numpy reference of
its rule drops and reports their count; a mesh with Explicit axes works; the whole tiny model gives the
same logits, expert counts and loss gradients.

"ragged_a2a" cannot run on XLA:CPU (no ragged-all-to-all there): its offset/size bookkeeping runs here
with the collective replaced by `_ragged_reference` (its documented semantics, built from all_gather);
tests/test_ep_export.py lowers it with the real collective for TPU and GPU.
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

import jaxmoe
import parity_util as pu
from jaxmoe.kernels import dispatch
from jaxmoe.layers.moe import MoE
from jaxmoe.parallel import ep, ep_a2a
from jaxmoe.parallel.context import EPSpec, ep_scope

TOL = 1e-5
B, T = 2, 9  # 18 rows: not a multiple of 8 shards, so the padding path runs too
CFG = jaxmoe.tiny(hidden_size=10, moe_intermediate_size=6, n_routed_experts=16, num_experts_per_tok=3,
                  n_group=4, topk_group=2, initializer_range=0.4)


def _mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


def _ragged_reference(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name):
    """jax.lax.ragged_all_to_all by its docstring: source i's rows [input_offsets[j], +send_sizes[j]) land
    in device j's output at output_offsets[j] (recv_sizes is implied by the sources' send sizes)."""
    ops = jax.lax.all_gather(operand, axis_name)  # [ep, n, ...]
    io, ss, oo = (jax.lax.all_gather(a, axis_name) for a in (input_offsets, send_sizes, output_offsets))
    me = jax.lax.axis_index(axis_name)
    r = jnp.arange(output.shape[0])
    out = output
    for i in range(ops.shape[0]):
        lo = oo[i, me]
        hit = (r >= lo) & (r < lo + ss[i, me])
        val = ops[i][jnp.clip(io[i, me] + r - lo, 0, ops.shape[1] - 1)]
        out = jnp.where(hit.reshape((-1,) + (1,) * (out.ndim - 1)), val, out)
    return out


def _simulated(variant):
    return ep_a2a.simulate(_ragged_reference) if variant == "ragged_a2a" else contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def _layer():
    moe = MoE(CFG, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(1)
    moe.router.bias_E[...] = jnp.asarray(0.3 * rng.standard_normal(CFG.n_routed_experts), jnp.float32)
    x = jnp.asarray(rng.standard_normal((B, T, CFG.hidden_size)), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((B, T, CFG.hidden_size)), jnp.float32)
    return moe, x, ct


def _value_and_grads(moe, x, ct, spec):
    """(y, aux, d params, d x) of sum(y * ct), traced under ep_scope(spec)."""
    graphdef, params, rest = nnx.split(moe, nnx.Param, ...)

    def f(params, x):
        y, aux = nnx.merge(graphdef, params, rest)(x)
        return jnp.sum(y * ct), (y, aux)

    with ep_scope(spec):
        (_, (y, aux)), (dp, dx) = pu.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(params, x)
    return jax.tree.map(np.asarray, (y, aux, dp, dx))


@functools.lru_cache(maxsize=None)
def _single_device():
    return _value_and_grads(*_layer(), None)


def _assert_same(ours, ref, what):
    flat_o, flat_r = jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(ref)
    assert len(flat_o) == len(flat_r)
    for (path, a), b in zip(flat_o, flat_r):
        pu.assert_rel(a, b, TOL, f"{what} {jax.tree_util.keystr(path)}")


# (variant, mesh shape, mesh axes, expert axis, token axes): ep = 8, 4, 2 and a 2-axis expert group;
# rows split over the expert axis (expert axis among the token axes) or replicated over it.
CASES = {
    "allgather-ep4-rows_replicated": ("allgather", (2, 4), ("data", "expert"), "expert", ("data",)),
    "allgather-ep8-rows_split": ("allgather", (8,), ("expert",), "expert", ("expert",)),
    "a2a_fixed-ep4-rows_split": ("a2a_fixed", (2, 4), ("data", "expert"), "expert", ("data", "expert")),
    "a2a_fixed-ep2-rows_replicated": ("a2a_fixed", (4, 2), ("data", "expert"), "expert", ("data",)),
    "ragged_a2a-ep8_2axes-rows_split": ("ragged_a2a", (2, 4), ("x", "y"), ("x", "y"), ("x", "y")),
    "ragged_a2a-ep4-rows_replicated": ("ragged_a2a", (2, 4), ("data", "expert"), "expert", ("data",)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_layer_matches_single_device(case):
    variant, shape, names, expert_axis, token_axes = CASES[case]
    spec = EPSpec(_mesh(shape, names), expert_axis, token_axes, variant)
    with _simulated(variant):
        y, aux, dp, dx = _value_and_grads(*_layer(), spec)
    y0, aux0, dp0, dx0 = _single_device()
    assert np.abs(y0).max() > 0.1 and len(np.unique(aux0["counts"])) > 2  # non-trivial routing
    _assert_same(y, y0, "y")
    np.testing.assert_array_equal(aux["counts"], aux0["counts"])  # global counts, not one shard's
    pu.assert_rel(aux["seq_balance"], aux0["seq_balance"], TOL, "seq_balance")
    assert "dropped" not in aux  # dropless
    _assert_same(dx, dx0, "d x")
    _assert_same(dp, dp0, "d params")
    assert np.abs(dp0["router"]["w_DE"][...]).max() > 0  # the router gradient is compared, not zero


def _fixed_keep(experts, blocks, n_local, ep, factor):
    """a2a_fixed's rule in numpy: in each device's block of rows, pairs (token order, then k) for one
    destination device beyond ceil(factor * m*K / ep) are dropped."""
    keep = np.zeros(experts.shape, bool)
    for rows in np.split(np.arange(len(experts)), blocks):
        m, K = len(rows), experts.shape[1]
        cap = ep_a2a.peer_capacity(m, K, n_local, ep, factor)
        used = np.zeros(ep, int)
        for t in rows:
            for k in range(K):
                d = experts[t, k] // n_local
                if d < ep:  # (pad rows route nowhere)
                    keep[t, k] = used[d] < cap
                    used[d] += 1
    return keep


def _ragged_keep(experts, blocks, n_local, ep, factor):
    """ragged_a2a's rule in numpy: a receiving device takes at most ceil(factor * m*K) rows, from lower
    source devices first (in a source, token order then k)."""
    keep = np.zeros(experts.shape, bool)
    taken = np.zeros(ep, int)
    for rows in np.split(np.arange(len(experts)), blocks):  # sources in device order
        m, K = len(rows), experts.shape[1]
        cap = ep_a2a.recv_capacity(m, K, n_local, ep, factor)
        for t in rows:
            for k in range(K):
                d = experts[t, k] // n_local
                if d < ep:
                    keep[t, k] = taken[d] < cap
                    taken[d] += 1
    return keep


@pytest.mark.parametrize("variant", ["a2a_fixed", "ragged_a2a"])
def test_capacity_drops_match_reference(variant):
    """Over-capacity pairs are dropped exactly as the rule says: the output and every gradient equal the
    single-device experts with those pairs masked out, and aux["dropped"] counts them."""
    moe, x, ct = _layer()
    factor, E = 0.5, CFG.n_routed_experts
    spec = EPSpec(_mesh((8,), ("expert",)), "expert", ("expert",), variant, capacity_factor=factor)
    with _simulated(variant):
        y, aux, dp, dx = _value_and_grads(moe, x, ct, spec)
    # the reference: routing from the layer's own router, the rule on the 8 row blocks (18 rows padded to
    # 24, blocks of 3; the pad rows route nowhere), single-device dispatch with that keep mask
    experts = np.asarray(moe.router(x.reshape(B * T, -1)).experts)
    padded = np.concatenate([experts, np.full((6, experts.shape[1]), E)])
    rule = _fixed_keep if variant == "a2a_fixed" else _ragged_keep
    keep = rule(padded, 8, E // 8, 8, factor)[:B * T]
    dropped_ref = int((~keep).sum())
    assert dropped_ref > 0 and keep.sum() > 0  # the capacity bites, and not everything

    graphdef, params, rest = nnx.split(moe, nnx.Param, ...)

    def f(params, x):
        m = nnx.merge(graphdef, params, rest)
        xm = x.reshape(B * T, -1)
        rr = m.router(xm)
        y = dispatch.experts_swiglu(xm, rr.weights, rr.experts, m.w_gate_EDF[...], m.w_up_EDF[...],
                                    m.w_down_EFD[...], impl="segment", keep=jnp.asarray(keep))
        y = y.reshape(x.shape) + m.shared(x)
        return jnp.sum(y * ct), y

    (_, y0), (dp0, dx0) = pu.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(params, x)
    assert int(aux["dropped"]) == dropped_ref
    _assert_same(y, y0, "y")
    _assert_same(dx, dx0, "d x")
    _assert_same(dp, jax.tree.map(np.asarray, dp0), "d params")


def test_fixed_capacity_hand_count():
    """Every pair to device 0's experts, 8 sources of m = 2 rows, K = 2, capacity factor 1: each source may
    send ceil(1 * 2*2 / 4) = 1 pair to device 0, so 8 pairs arrive and 8 * 3 = 24 are dropped."""
    E, D, F, M = 8, 4, 3, 16
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((M, D)), jnp.float32)
    w = jnp.asarray(rng.random((M, 2)), jnp.float32)
    experts = jnp.asarray(np.tile([[0, 1]], (M, 1)), jnp.int32)  # device 0 holds experts 0, 1
    wg, wu = (jnp.asarray(rng.standard_normal((E, D, F)), jnp.float32) for _ in range(2))
    wd = jnp.asarray(rng.standard_normal((E, F, D)), jnp.float32)
    spec = EPSpec(_mesh((2, 4), ("data", "expert")), "expert", ("data", "expert"), "a2a_fixed",
                  capacity_factor=1.0)
    fn = pu.jit(functools.partial(ep.experts_swiglu_ep, spec=spec, impl="segment"))
    y, dropped = fn(x, w, experts, wg, wu, wd)
    assert int(dropped) == 24
    keep = np.zeros((M, 2), bool)
    keep[::2, 0] = True  # each source's first row, first choice
    y0 = dispatch.experts_swiglu(x, w, experts, wg, wu, wd, "segment", keep=jnp.asarray(keep))
    pu.assert_rel(y, y0, TOL, "y")


def test_explicit_mesh_axes():
    """On a mesh with Explicit axes (sharding in types) the rows are resharded into the shard_map and the
    result comes back in the caller's layout."""
    E, D, F, M, K = 8, 4, 3, 16, 2
    rng = np.random.default_rng(2)
    mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=(AxisType.Explicit,) * 2)
    rows = jax.sharding.NamedSharding(mesh, jax.P("data"))
    x = jax.device_put(jnp.asarray(rng.standard_normal((M, D)), jnp.float32), rows)
    w = jax.device_put(jnp.asarray(rng.random((M, K)), jnp.float32), rows)
    experts = jax.device_put(jnp.asarray(_distinct_experts(rng, M, K, E)), rows)
    wg, wu = (jnp.asarray(rng.standard_normal((E, D, F)), jnp.float32) for _ in range(2))
    wd = jnp.asarray(rng.standard_normal((E, F, D)), jnp.float32)
    spec = EPSpec(mesh, "expert", ("data",), "a2a_fixed")
    with jax.set_mesh(mesh):
        y, dropped = pu.jit(functools.partial(ep.experts_swiglu_ep, spec=spec, impl="segment"))(
            x, w, experts, wg, wu, wd)
    assert dropped is None and y.sharding.is_equivalent_to(x.sharding, 2)
    y0 = dispatch.experts_swiglu(*(jax.device_get(a) for a in (x, w, experts)), wg, wu, wd, "segment")
    pu.assert_rel(y, y0, TOL, "y")


def _distinct_experts(rng, M, K, E):
    return np.stack([rng.choice(E, K, replace=False) for _ in range(M)]).astype(np.int32)


def test_ragged_on_cpu_raises_naming_alternatives():
    spec = EPSpec(_mesh((8,), ("expert",)), "expert", ("expert",), "ragged_a2a")
    z = jnp.zeros((8, 4))
    with pytest.raises(NotImplementedError, match="a2a_fixed.*allgather"):
        ep.experts_swiglu_ep(z, z[:, :2], z[:, :2].astype(jnp.int32), jnp.zeros((8, 4, 2)),
                             jnp.zeros((8, 4, 2)), jnp.zeros((8, 2, 4)), spec=spec, impl="segment")


def test_bad_specs_raise():
    z = jnp.zeros((8, 4))
    args = (z, z[:, :2], z[:, :2].astype(jnp.int32), jnp.zeros((6, 4, 2)), jnp.zeros((6, 4, 2)),
            jnp.zeros((6, 2, 4)))
    with pytest.raises(ValueError, match="n_routed_experts=6 is not divisible by the 4 devices"):
        ep.experts_swiglu_ep(*args, spec=EPSpec(_mesh((2, 4), ("d", "e")), "e", ("d",)), impl="segment")
    with pytest.raises(ValueError, match="capacity_factor applies to the all-to-all variants"):
        ep.experts_swiglu_ep(*args, spec=EPSpec(_mesh((4, 2), ("d", "e")), "e", ("d",), "allgather", 1.0),
                             impl="segment")
    with pytest.raises(ValueError, match="some but not all of the expert axes"):
        ep.layout(EPSpec(_mesh((2, 2, 2), ("d", "e", "f")), ("e", "f"), ("d", "e")))


def test_tiny_model_under_ep_scope():
    """The whole tiny model (a dense layer and two scanned MoE layers): logits, per-layer expert counts and
    the gradient of the next-token loss w.r.t. every parameter are the same with and without EP."""
    cfg = jaxmoe.tiny(n_routed_experts=8, initializer_range=0.1, num_nextn_predict_layers=0)
    model = jaxmoe.DeepseekV3(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    toks = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)), jnp.int32)

    def loss(params):
        out = nnx.merge(graphdef, params, rest).forward(toks)
        logp = jax.nn.log_softmax(out.logits[:, :-1])
        return -jnp.take_along_axis(logp, toks[:, 1:, None], axis=-1).mean(), (out.logits, out.aux["counts"])

    def run(spec):
        with ep_scope(spec):
            return jax.tree.map(np.asarray, pu.jit(jax.value_and_grad(loss, has_aux=True))(params))

    spec = EPSpec(_mesh((2, 4), ("data", "expert")), "expert", ("data", "expert"), "a2a_fixed")
    (l_ep, (logits_ep, counts_ep)), g_ep = run(spec)
    (l0, (logits0, counts0)), g0 = run(None)
    assert counts0.shape == (2, 8) and len(np.unique(counts0)) > 2
    pu.assert_rel(l_ep, l0, 1e-6, "loss")
    pu.assert_rel(logits_ep, logits0, TOL, "logits")
    np.testing.assert_array_equal(counts_ep, counts0)
    _assert_same(g_ep, g0, "d params")
