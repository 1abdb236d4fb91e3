#!/usr/bin/env bash
# GPU check of the Pallas MoE kernels, in one call (well under 8 minutes on one H100/H200):
#   1. each kernel (router, permute/combine, grouped matmul + transposed + weight-gradient, the whole
#      moe_impl="pallas" dispatch, capacity mode) against its reference ON THE GPU, forward and gradient;
#   2. grouped-matmul TFLOP/s (forward, d lhs, d rhs) against a dense bf16 matmul of the same useful FLOPs,
#      over a few block sizes; router kernel time against the jnp router; MoE layer time (pallas vs
#      ragged_dot), forward and forward+backward.
# Any mismatch (or a kernel that fails to compile/run) is printed as "MISMATCH ..." and the script exits 1.
#
#   bash bench/gpu_check.sh                      # on the GPU machine, from the repo root
#   GPU_CHECK_SMOKE=1 bash bench/gpu_check.sh    # CPU dry run: interpret mode, tiny sizes (tests the script)
#
# Uses the machine's python3 with jax[cuda] (and flax); the repo goes on PYTHONPATH. Results also go to
# $OUT/gpu_check.json when OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && [ "${GPU_CHECK_SMOKE:-0}" = 1 ] && PY=.venv/bin/python
exec "$PY" - <<'PYEOF'
import json, os, statistics, sys, time, traceback

import jax
import jax.numpy as jnp
import numpy as np

SMOKE = os.environ.get("GPU_CHECK_SMOKE") == "1"
T0 = time.time()
print(f"jax {jax.__version__}  backend {jax.default_backend()}  devices {jax.devices()}  smoke={SMOKE}")
if not SMOKE and jax.default_backend() != "gpu":
    sys.exit("MISMATCH: no GPU backend (set GPU_CHECK_SMOKE=1 for a CPU dry run)")

import jaxmoe  # noqa: E402
from jaxmoe.kernels import dispatch, resolve  # noqa: E402
from jaxmoe.kernels.gmm import ops as gmm_ops, reference as gmm_ref  # noqa: E402
from jaxmoe.kernels.permute import ops as perm_ops, reference as perm_ref  # noqa: E402
from jaxmoe.kernels.router import ops as router_ops  # noqa: E402
from jaxmoe.kernels.router.reference import RouterSpec  # noqa: E402
from jaxmoe.layers.router import route as core_route  # noqa: E402

PLATFORM, INTERPRET = resolve(None, None)
KW = dict(platform=PLATFORM, interpret=INTERPRET)
FAIL, REPORT = [], {}
HI = jax.lax.Precision.HIGHEST


def s(big, small):
    return small if SMOKE else big


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def expect(name, ok, detail=""):
    print(f"  {'ok      ' if ok else 'MISMATCH'} {name} {detail}")
    if not ok:
        FAIL.append(f"{name} {detail}")


def close(name, got, want, tol):
    r = rel(got, want)
    expect(name, np.isfinite(np.asarray(got, np.float64)).all() and r <= tol, f"rel={r:.2e} (tol {tol:.0e})")


def check(fn):
    def run():
        print(f"[{time.time() - T0:6.1f}s] {fn.__name__}")
        try:
            fn()
        except Exception as e:  # a kernel that does not compile or run is a failure too
            traceback.print_exc()
            expect(fn.__name__, False, f"raised {type(e).__name__}: {str(e)[:300]}")
    return run


def timeit(f, *args, iters=None):
    """Median seconds of a jitted call (compiled and warmed first)."""
    jax.block_until_ready(f(*args))
    iters = iters or s(10, 1)
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def rnd(key, shape, dtype=jnp.float32, scale=1.0):
    return (scale * jax.random.normal(jax.random.PRNGKey(key), shape, jnp.float32)).astype(dtype)


def routing(key, T, E, K):
    logits = rnd(key, (T, E))
    ids = jax.lax.top_k(logits, K)[1].astype(jnp.int32)
    return ids, jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(key + 1), (T, K)), -1)


# ------------------------------------------------------------------------------------------- correctness
@check
def router():
    for name, cfg in [("v3", jaxmoe.tiny(n_routed_experts=256, n_group=8, topk_group=4, num_experts_per_tok=8,
                                          routed_scaling_factor=2.5)),
                      ("v2", jaxmoe.tiny(n_routed_experts=160, n_group=8, topk_group=3, num_experts_per_tok=6,
                                          topk_method="group_limited_greedy", scoring_func="softmax",
                                          norm_topk_prob=False, routed_scaling_factor=16.0))]:
        T, E = s(8192, 64), cfg.n_routed_experts
        spec = RouterSpec.from_config(cfg)
        logits = rnd(1, (T, E), scale=2.0)
        bias = rnd(2, (E,), scale=0.3) if cfg.has_router_bias else None
        ct = rnd(3, (T, spec.top_k))
        ours = jax.jit(lambda l, b: router_ops.route(l, b, spec, **KW))
        core = jax.jit(lambda l, b: core_route(l, b, cfg))
        w, ids, sc = ours(logits, bias)
        r = core(logits, bias)
        ids, rid = np.asarray(ids), np.asarray(r.experts)
        same = (np.sort(ids, -1) == np.sort(rid, -1)).all(-1)
        # the kernel's sigmoid/softmax may differ from XLA's in the last bit: a changed choice is allowed
        # only for a near-tie, where the swapped experts' selection scores agree to 1e-5
        sel = np.asarray(r.scores) + (0 if bias is None else np.asarray(bias))
        near = [abs(np.sort(sel[t, ids[t]]).sum() - np.sort(sel[t, rid[t]]).sum()) <= 1e-5 * spec.top_k
                for t in np.flatnonzero(~same)]
        expect(f"router {name} ids", all(near) and (~same).mean() <= 1e-3,
               f"{(~same).sum()} of {T} rows differ (near-ties: {sum(near)})")
        close(f"router {name} weights", np.asarray(w)[same], np.asarray(r.weights)[same], 1e-5)
        close(f"router {name} scores", sc, r.scores, 1e-5)
        g = jax.jit(jax.grad(lambda l: (ours(l, bias)[0] * ct).sum() + (ours(l, bias)[2] ** 2).sum()))(logits)
        gr = jax.jit(jax.grad(lambda l: (core(l, bias).weights * ct).sum() + (core(l, bias).scores ** 2).sum()))(logits)
        close(f"router {name} d logits", g, gr, 1e-4)


@check
def permute_combine():
    T, K, E, D = s(4096, 16), 8, s(256, 12), s(1024, 16)
    for dt, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)):
        experts, w = routing(4, T, E, K)
        keep = jax.random.uniform(jax.random.PRNGKey(5), (T, K)) > 0.2
        for align, kp in ((64, None), (1, keep)):
            plan = perm_ops.make_plan(experts, E, align=align, row_multiple=64, keep=kp)
            R = plan.row_pair.shape[0]
            x, ys, ct = rnd(6, (T, D), dt), rnd(7, (R, D), dt), rnd(8, (T, D))
            tag = f"{jnp.dtype(dt).name} align={align}{' capacity' if kp is not None else ''}"
            xs = jax.jit(lambda x: perm_ops.permute(x, plan, **KW))(x)
            expect(f"permute {tag}", np.array_equal(np.asarray(xs, np.float32),
                                                    np.asarray(perm_ref.gather_rows(x, perm_ops.row_token(plan, K)), np.float32)))
            f = lambda ys, w, x: (perm_ops.combine(ys, w, plan, **KW).astype(jnp.float32) * ct).sum() + \
                (perm_ops.permute(x, plan, **KW).astype(jnp.float32) * ys.astype(jnp.float32)).sum()
            fr = lambda ys, w, x: (perm_ref.combine(ys, plan.pos, w * plan.keep).astype(jnp.float32) * ct).sum() + \
                (perm_ref.gather_rows(x, perm_ops.row_token(plan, K)).astype(jnp.float32) * ys.astype(jnp.float32)).sum()
            out = jax.jit(lambda ys, w: perm_ops.combine(ys, w, plan, **KW))(ys, w)
            close(f"combine {tag}", out, perm_ref.combine(ys, plan.pos, w * plan.keep), tol)
            g = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(ys, w, x)
            gr = jax.jit(jax.grad(fr, argnums=(0, 1, 2)))(ys, w, x)
            for lab, a, b in zip(("d ys", "d w", "d x"), g, gr):
                close(f"combine/permute {tag} {lab}", a, b, tol)


def group_rows(key, E, rows, align):
    sizes = np.array(jax.random.randint(jax.random.PRNGKey(key), (E,), 0, 2 * rows // E))
    sizes[: E // 8] = 0                      # empty groups
    sizes[E // 2] += rows // 4               # one big group
    padded = -(-sizes // align) * align
    return jnp.asarray(padded, jnp.int32), int(padded.sum())


def ref_gmm_loop(lhs, rhs, gr, transpose):
    """Per-group reference (float32, HIGHEST precision)."""
    out, r0 = [], 0
    for e, n in enumerate(np.asarray(gr)):
        w = rhs[e].T if transpose else rhs[e]
        out.append(jnp.dot(lhs[r0:r0 + n].astype(jnp.float32), w.astype(jnp.float32), precision=HI))
        r0 += n
    out.append(jnp.zeros((lhs.shape[0] - r0, out[0].shape[1]), jnp.float32))
    return jnp.concatenate(out)


@check
def grouped_matmul():
    E, Kd, N = s(64, 6), s(1024, 32), s(512, 32)
    block = gmm_ops.BlockSizes(bm=s(64, 8), bk=s(64, 8), bn=s(128, 8))
    gr, used = group_rows(9, E, s(16384, 64), block.bm)
    R = -(-(used + 3 * block.bm) // block.bm) * block.bm
    for dt, tol in ((jnp.bfloat16, 2e-2), (jnp.float32, 5e-3)):  # f32 dots may run as TF32 in Triton
        lhs = rnd(10, (R, Kd), dt).at[used:].set(0)
        for transpose in (False, True):
            rhs = rnd(11, (E, N, Kd) if transpose else (E, Kd, N), dt, 0.05)
            tag = f"{jnp.dtype(dt).name}{' transposed' if transpose else ''}"
            f = jax.jit(lambda l, r: gmm_ops.gmm(l, r, gr, transpose_rhs=transpose, block=block, **KW))
            y = f(lhs, rhs)
            close(f"gmm {tag}", y, ref_gmm_loop(lhs, rhs, gr, transpose), tol)
            ct = rnd(12, y.shape, jnp.float32)
            g = jax.jit(jax.grad(lambda l, r: (f(l, r).astype(jnp.float32) * ct).sum(), argnums=(0, 1)))(lhs, rhs)
            with jax.default_matmul_precision("highest"):
                gref = jax.jit(jax.grad(lambda l, r: (gmm_ref.gmm(l.astype(jnp.float32), r.astype(jnp.float32), gr,
                                                                  transpose) * ct).sum(), argnums=(0, 1)))(lhs, rhs)
            close(f"gmm {tag} d lhs", g[0], gref[0], tol)
            close(f"gmm {tag} d rhs", g[1], gref[1], tol)
            empty = np.flatnonzero(np.asarray(gr) == 0)
            expect(f"gmm {tag} empty groups get zero d rhs", not np.asarray(g[1])[empty].any())


@check
def moe_dispatch():
    T, K, E, D, F = s(2048, 24), s(8, 2), s(64, 6), s(512, 16), s(256, 8)
    experts, w = routing(13, T, E, K)
    x, wg, wu, wd = rnd(14, (T, D)), rnd(15, (E, D, F), scale=0.05), rnd(16, (E, D, F), scale=0.05), rnd(17, (E, F, D), scale=0.05)
    keep, dropped = dispatch.capacity_keep(experts, E, 0.8)
    for kp in (None, keep):
        def loss(impl, *a):
            return jnp.sum(dispatch.experts_swiglu(*a, impl=impl, keep=kp) ** 2)
        args = (x, w, experts, wg, wu, wd)
        with jax.default_matmul_precision("highest"):
            want = jax.jit(jax.value_and_grad(lambda *a: loss("ragged_dot", *a), argnums=(0, 1, 3, 4, 5)))(*args)
        got = jax.jit(jax.value_and_grad(lambda *a: loss("pallas", *a), argnums=(0, 1, 3, 4, 5)))(*args)
        tag = "capacity" if kp is not None else "dropless"
        close(f"moe pallas vs ragged_dot {tag} loss", got[0], want[0], 5e-3)
        for lab, a, b in zip(("dx", "dw", "dw_gate", "dw_up", "dw_down"), got[1], want[1]):
            close(f"moe pallas vs ragged_dot {tag} {lab}", a, b, 5e-3)
    expect("capacity drops pairs", int(dropped) > 0, f"dropped={int(dropped)}")


# ------------------------------------------------------------------------------------------- performance
@check
def gmm_speed():
    E, D, F, T, K = 256, s(7168, 64), s(2048, 32), s(8192, 64), 8
    experts, _ = routing(20, T, E, K)
    dense_flops = 2.0 * T * K * D * F
    a = rnd(21, (T * K, D), jnp.bfloat16)
    b = rnd(22, (D, F), jnp.bfloat16, 0.02)
    t_dense = timeit(jax.jit(lambda a, b: a @ b), a, b)
    res = {"dense bf16 matmul": dict(ms=t_dense * 1e3, tflops=dense_flops / t_dense / 1e12)}
    print(f"  dense bf16 [{T * K}, {D}] x [{D}, {F}]: {t_dense * 1e3:.2f} ms, {dense_flops / t_dense / 1e12:.0f} TFLOP/s")
    w = rnd(23, (E, D, F), jnp.bfloat16, 0.02)
    for bm, bk, bn, nw, ns in s([(64, 64, 128, 4, 3), (128, 64, 128, 8, 3), (64, 32, 256, 8, 4), (128, 32, 128, 4, 4)],
                                [(8, 8, 8, 4, 3)]):
        block = gmm_ops.BlockSizes(bm, bk, bn, nw, ns)
        plan = perm_ops.make_plan(experts, E, align=bm, row_multiple=bm)
        R = plan.row_pair.shape[0]
        xs = rnd(24, (R, D), jnp.bfloat16)
        dy = rnd(25, (R, F), jnp.bfloat16)
        tag = f"bm={bm} bk={bk} bn={bn} warps={nw} stages={ns}"
        try:
            tf = timeit(jax.jit(lambda x, w: gmm_ops.gmm(x, w, plan.group_rows, block=block, **KW)), xs, w)
            tb = timeit(jax.jit(lambda d, w: gmm_ops.gmm(d, w, plan.group_rows, transpose_rhs=True, block=block, **KW)), dy, w)
            tw = timeit(jax.jit(lambda x, d: gmm_ops.tgmm(x, d, plan.group_rows, block=block, **KW)), xs, dy)
        except Exception as e:
            print(f"  {tag}: failed {type(e).__name__}: {str(e)[:200]}")
            continue
        pad = int(np.asarray(plan.group_rows).sum()) / (T * K)
        r = {k: dict(ms=t * 1e3, tflops=dense_flops / t / 1e12, vs_dense=t_dense / t)
             for k, t in (("fwd", tf), ("d lhs", tb), ("d rhs (tgmm)", tw))}
        res[tag] = dict(r, padded_rows_over_pairs=pad)
        print(f"  gmm {tag} (rows incl. padding / pairs = {pad:.3f}): " + ", ".join(
            f"{k} {v['ms']:.2f} ms {v['tflops']:.0f} TFLOP/s ({v['vs_dense']:.2f}x dense)" for k, v in r.items()))
    REPORT["gmm"] = res


@check
def router_speed():
    cfg = jaxmoe.tiny(n_routed_experts=256, n_group=8, topk_group=4, num_experts_per_tok=8)
    spec = RouterSpec.from_config(cfg)
    logits, bias = rnd(30, (s(65536, 64), 256)), rnd(31, (256,), scale=0.3)
    tk = timeit(jax.jit(lambda l, b: router_ops.route(l, b, spec, **KW)[:2]), logits, bias)
    tj = timeit(jax.jit(lambda l, b: core_route(l, b, cfg)[:2]), logits, bias)
    REPORT["router"] = dict(tokens=logits.shape[0], kernel_ms=tk * 1e3, jnp_ms=tj * 1e3, speedup=tj / tk)
    print(f"  router T={logits.shape[0]} E=256: kernel {tk * 1e3:.3f} ms, jnp {tj * 1e3:.3f} ms ({tj / tk:.2f}x)")


@check
def moe_layer_speed():
    T, K, E, D, F = s(4096, 32), 8, s(256, 16), s(7168, 64), s(2048, 32)
    experts, w = routing(40, T, E, K)
    x = rnd(41, (T, D), jnp.bfloat16)
    ws = [rnd(42 + i, sh, jnp.bfloat16, 0.02) for i, sh in enumerate(((E, D, F), (E, D, F), (E, F, D)))]
    flops = 2.0 * 3 * T * K * D * F
    res = {}
    for impl in ("pallas", "ragged_dot"):
        f = jax.jit(lambda x, w, e, a, b, c, impl=impl: dispatch.experts_swiglu(x, w, e, a, b, c, impl))
        g = jax.jit(jax.grad(lambda x, w, e, a, b, c, impl=impl: jnp.sum(
            dispatch.experts_swiglu(x, w, e, a, b, c, impl).astype(jnp.float32) ** 2), argnums=(0, 1, 3, 4, 5)))
        for kind, fn, fl in (("fwd", f, flops), ("fwd+bwd", g, 3 * flops)):
            if impl == "ragged_dot" and kind == "fwd+bwd" and res.get("ragged_dot fwd", {}).get("ms", 1e9) > 1000:
                res[f"{impl} {kind}"] = "skipped: forward > 1 s (dense fallback?)"
                continue
            try:
                t = timeit(fn, x, w, experts, *ws, iters=s(5 if impl == "pallas" else 2, 1))
                res[f"{impl} {kind}"] = dict(ms=t * 1e3, tflops=fl / t / 1e12)
                print(f"  MoE experts T={T} E={E} D={D} F={F} {impl} {kind}: {t * 1e3:.2f} ms, {fl / t / 1e12:.0f} useful TFLOP/s")
            except Exception as e:  # ragged_dot may fall back to a dense path that does not fit
                res[f"{impl} {kind}"] = f"failed: {type(e).__name__}"
                print(f"  {impl} {kind}: failed {type(e).__name__}: {str(e)[:200]}")
                if impl == "pallas":
                    FAIL.append(f"pallas MoE {kind} failed")
    REPORT["moe_layer"] = res


for step in (router, permute_combine, grouped_matmul, moe_dispatch, gmm_speed, router_speed, moe_layer_speed):
    step()
REPORT.update(failures=FAIL, seconds=time.time() - T0, jax=jax.__version__, device=str(jax.devices()[0]))
if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "gpu_check.json"), "w") as fh:
        json.dump(REPORT, fh, indent=1)
print(f"[{time.time() - T0:6.1f}s] done")
if FAIL:
    print("GPU CHECK FAILED:\n  " + "\n  ".join(FAIL))
    sys.exit(1)
print("GPU CHECK PASSED")
PYEOF
