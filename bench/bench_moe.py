"""MoE dispatch benchmark on the CPU: compiled FLOPs and wall time of the routed experts.

    python bench/bench_moe.py --out BENCHMARKS.md        # appends/replaces the "## MoE kernels" section

A DeepSeek-V3-shaped layer at scaled width: 256 routed experts, top-8 in 8 groups (4 kept), sigmoid router
with a zero bias, D = 7168/8 = 896, F = 2048/8 = 256 by default; x ~ RMS-normalised N(0, 1), router and
expert weights N(0, 0.02). For each token count T:

1. FLOPs: XLA cost analysis (`compiled.cost_analysis()["flops"]`) of the jitted forward of every
   `moe_impl`, over the ideal active-expert FLOPs 2*3*T*K*D*F. XLA counts a while-loop body once, so for
   the loop paths the loop bodies are compiled alone (one chunk / one grid step) and multiplied by the
   trip counts this routing produces: "segment" = the program outside its loops + sum over buckets of
   chunks * (cost of one chunk of that size); "pallas" is counted on its GPU layout (row tiles of
   `dispatch.pallas_row_tile` rows, padded per expert: tiles * cost of one tile's matmuls). A dense-masked
   dispatch is ~E/K = 32x; XLA:CPU's ragged_dot ~E x.
2. CPU time: the fastest CPU path ("segment") against a dense SwiGLU of the same active FLOPs
   (x [T, D] through width K*F), forward and forward+backward (grads of 0.5*|y|^2 w.r.t. x and all
   weights), interleaved round by round in one process; medians of wall and of process CPU time (the
   machine is shared: CPU time is the steadier measure of the work). Also the whole MoE layer forward
   (router logits + top-k + dispatch) against the same dense SwiGLU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import jaxmoe  # noqa: E402
from _common import jit_case  # noqa: E402
from jaxmoe.kernels import dispatch, segment  # noqa: E402
from jaxmoe.kernels.permute import ops as perm_ops  # noqa: E402
from jaxmoe.layers.router import route  # noqa: E402

SECTION = "## MoE kernels"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def xla_flops(fn, *args) -> float:
    return float(jax.jit(fn).lower(*args).compile().cost_analysis().get("flops", 0.0))


def make_layer(T, D, F, E, K, seed=0):
    cfg = jaxmoe.tiny(n_routed_experts=E, num_experts_per_tok=K, n_group=8, topk_group=4, hidden_size=D,
                      moe_intermediate_size=F, routed_scaling_factor=2.5)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, D)).astype(np.float32)
    x /= np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)
    f = lambda *s: jnp.asarray(0.02 * rng.standard_normal(s), jnp.float32)  # noqa: E731
    p = dict(x=jnp.asarray(x), router=f(D, E), wg=f(E, D, F), wu=f(E, D, F), wd=f(E, F, D),
             dg=f(D, K * F), du=f(D, K * F), dd=f(K * F, D))
    r = route(p["x"] @ p["router"], jnp.zeros((E,)), cfg)
    p.update(weights=r.weights, experts=r.experts)
    return cfg, p


def swiglu(x, g, u, d):
    return (jax.nn.silu(x @ g) * (x @ u)) @ d


# ------------------------------------------------------------------------------------------------ FLOPs
def flops_table(p, T, D, F, E, K):
    ideal = 2.0 * 3 * T * K * D * F
    args = (p["x"], p["weights"], p["experts"], p["wg"], p["wu"], p["wd"])
    rows = {}
    for impl in ("dense", "ragged_dot"):
        rows[impl] = xla_flops(lambda *a, impl=impl: dispatch.experts_swiglu(*a, impl=impl), *args)
    # segment: program outside the loops + chunks * one chunk's cost, per bucket
    sizes = segment.buckets(segment.default_cap(T * K, E))
    plan = jax.jit(lambda e: segment.make_plan(e, E, sizes))(p["experts"])
    counts = [int(it.count) for it in plan.items]

    def chunk(xt, wg, wu, wd):
        return (jax.nn.silu(xt @ wg) * (xt @ wu)) @ wd

    body = {s: xla_flops(chunk, jnp.zeros((s, D)), p["wg"][0], p["wu"][0], p["wd"][0]) for s in sizes}
    whole = xla_flops(lambda *a: dispatch.experts_swiglu(*a, impl="segment"), *args)
    outside = max(whole - sum(body.values()), 0.0)  # each loop body counted once by XLA
    rows["segment"] = outside + sum(c * body[s] for s, c in zip(sizes, counts))
    seg_rows = sum(c * s for s, c in zip(sizes, counts))
    # pallas, GPU layout: row tiles of bm padded per expert; a tile costs its three tile matmuls
    bm = dispatch.pallas_row_tile(T * K, E, "gpu")
    pplan = jax.jit(lambda e: perm_ops.make_plan(e, E, align=bm, row_multiple=bm))(p["experts"])
    tiles = int(np.asarray(pplan.group_rows).sum()) // bm
    rows["pallas (GPU layout)"] = tiles * body.get(bm, xla_flops(chunk, jnp.zeros((bm, D)), p["wg"][0],
                                                                  p["wu"][0], p["wd"][0]))
    router_flops = 2.0 * T * D * E
    info = dict(ideal=ideal, seg_rows=seg_rows, pairs=T * K, buckets=len(sizes), cap=sizes[-1],
                pallas_rows=tiles * bm, pallas_bm=bm, router_over_ideal=router_flops / ideal)
    return {k: v / ideal for k, v in rows.items()}, info


# ------------------------------------------------------------------------------------------------ timing
def grad_of(f, n):
    return jax.grad(lambda *a: 0.5 * jnp.sum(jnp.square(f(*a))), argnums=tuple(range(n)))


def time_cases(cfg, p, rounds, caps):
    w, e = p["weights"], p["experts"]
    dense_args = (p["x"], p["dg"], p["du"], p["dd"])

    def seg(cap):
        return lambda x, wts, ex, a, b, c: dispatch.experts_swiglu(x, wts, ex, a, b, c, "segment", cap)

    def layer(x, router, ex_w, a, b, c):  # router logits + group-limited top-k + dispatch
        r = route(x @ router, jnp.zeros((router.shape[1],)), cfg)
        return dispatch.experts_swiglu(x, r.weights, r.experts, a, b, c, "segment")

    cases = [jit_case("dense SwiGLU fwd", swiglu, dense_args),
             jit_case("dense SwiGLU fwd+bwd", grad_of(swiglu, 4), dense_args)]
    for cap in caps:
        tag = f"segment cap={cap}" if cap else "segment"
        f = seg(cap)
        cases.append(jit_case(f"{tag} fwd", f, (p["x"], w, e, p["wg"], p["wu"], p["wd"])))
        g = jax.grad(lambda x, wts, ex, a, b, c, f=f: 0.5 * jnp.sum(jnp.square(f(x, wts, ex, a, b, c))),
                     argnums=(0, 1, 3, 4, 5))
        cases.append(jit_case(f"{tag} fwd+bwd", g, (p["x"], w, e, p["wg"], p["wu"], p["wd"])))
    cases.append(jit_case("MoE layer fwd (router + segment)", layer,
                          (p["x"], p["router"], w, p["wg"], p["wu"], p["wd"])))
    log("  compiled: " + ", ".join(f"{c.key} {c.warm_s:.1f}s" for c in cases))
    _common.run_rounds(cases, rounds, log)
    return cases


# ---------------------------------------------------------------------------------------------- report
def section(results, args) -> str:
    L = [SECTION, "",
         f"`python bench/bench_moe.py {' '.join(args.argv)}` ({datetime.date.today()}, {platform.machine()}, "
         f"{os.cpu_count()} CPUs shared with other jobs, jax {jax.__version__}). DeepSeek-V3-shaped layer: "
         f"E={args.experts} routed experts, top-{args.topk} in 8 groups (4 kept), D={args.hidden}, "
         f"F={args.inter}, float32; routing from a random router (sigmoid, zero bias).", "",
         "**Compiled FLOPs / ideal active-expert FLOPs** (2*3*T*K*D*F; routed experts only, XLA cost analysis, "
         "loop bodies times their trip counts; see the script docstring). Goal <= 1.15.", "",
         "| T | rows/expert | segment | pallas (GPU layout; row tile) | ragged_dot (XLA:CPU) | dense |",
         "|---|---|---|---|---|---|"]
    for r in results:
        fl = r["flops"]
        L.append(f"| {r['T']} | {r['T'] * args.topk / args.experts:.0f} | **{fl['segment']:.3f}** | "
                 f"{fl['pallas (GPU layout)']:.3f} (bm={r['info']['pallas_bm']}) | {fl['ragged_dot']:.1f} | "
                 f"{fl['dense']:.1f} |")
    r0 = results[0]["info"]
    L += ["", f"The router matmul adds {r0['router_over_ideal']:.3f} x ideal at this width (2*T*D*E; "
          f"{2 * 256 / (6 * 2048 * 8):.4f} x at the real D, F). segment padding: rows computed / pairs = "
          + ", ".join(f"{r['info']['seg_rows'] / r['info']['pairs']:.3f} (T={r['T']})" for r in results) + ".",
          "", "**CPU time, segment over a dense SwiGLU of the same active FLOPs** (medians of "
          f"{args.rounds} interleaved rounds; wall and process CPU time). Goal <= 1.5 (wall, forward).", "",
          "| T | case | wall ms | wall ratio | CPU ms | CPU ratio | compile s |", "|---|---|---|---|---|---|---|"]
    for r in results:
        base = {k: v for k, v in r["times"].items() if k.startswith("dense")}
        for name, (wm, cm, cs) in r["times"].items():
            ref = base["dense SwiGLU fwd+bwd" if "bwd" in name else "dense SwiGLU fwd"]
            bold = "**" if name.startswith("segment fwd") else ""
            L.append(f"| {r['T']} | {name} | {wm * 1e3:.1f} | {bold}{wm / ref[0]:.2f}{bold} | {cm * 1e3:.1f} | "
                     f"{cm / ref[1]:.2f} | {cs:.1f} |")
    L += ["", NOTES]
    return "\n".join(L) + "\n"


NOTES = """Notes (from profiling the segment path on this machine, bench/bench_moe.py and ad-hoc variants):

- The old fixed-tile segment path (rows scattered into a tile-padded copy, one loop step per 16-64-row
  tile, einsum combine) measured 2.0-3.5x the dense SwiGLU forward at T=2048 (E=256, K=8, D=512,
  F=128; the new path 1.4-1.8x there, from 64-row GEMMs at the narrower width). What
  dominated: the row scatter into the padded buffer (~35 ms alone at T=2048; XLA:CPU scatters
  element-wise), the [T, K, D] einsum combine (~20 ms vs ~2 ms for K row gathers), and above all
  the per-call cost of small GEMMs: XLA:CPU (YNNPACK) runs a [64, D] x [D, F] dot at ~55-65% of a
  large GEMM's rate, and a [16, D] one at ~35%, so cutting an expert into many tiles costs more than
  its padding. Loop overhead itself is ~0.3 us per iteration (negligible); dots in the loop do use
  the intra-op thread pool.
- Now: one GEMM triple per expert (bucketed chunk sizes), rows gathered from x inside the loop, the
  combine as K gathers, a custom VJP that keeps the gate/up products and materialises transposes
  for the weight-gradient dots (XLA:CPU takes its fast path only for the plain layout).
- What remains at 64 rows per expert (T=2048): small-GEMM efficiency (~0.35-0.4 of the ratio) and
  each expert's weights being copied out of the stacked [E, D, F] array per call (~0.1: the same loop
  with one static weight runs ~1.4x). The backward adds six small GEMMs per expert and the
  read-modify-write of the [E, D, F] float32 weight-gradient accumulators. At 256 rows per expert
  the forward is ~1.15x and forward+backward ~1.35x.
- Wall time on this shared 2-core machine varies by +-20% between runs (T=2048 forward measured
  1.12x and 1.50x wall, 1.39x and 1.49x CPU, in two runs of this script); CPU time is steadier.
- The MoE layer row adds the jnp router (logits, sigmoid, group-limited lax.top_k) to the dispatch.
- `bench/gpu_check.sh` (kernel checks on the GPU, grouped-matmul TFLOP/s vs a dense bf16 matmul,
  router and MoE layer times) is ready but has not been run: no GPU was lent to this session. It was
  dry-run on the CPU (`GPU_CHECK_SMOKE=1`, interpret mode, tiny sizes)."""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="2048,8192", help="comma-separated token counts T")
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--inter", type=int, default=256)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--caps", default="default", help="segment largest-chunk sizes to time ('default' or ints)")
    ap.add_argument("--out", help="markdown file: append/replace the '## MoE kernels' section")
    ap.add_argument("--json", help="write raw results here")
    ap.add_argument("--from-json", help="only re-render the markdown from a --json file of an earlier run")
    args = ap.parse_args()
    args.argv = sys.argv[1:]
    caps = [None if c == "default" else int(c) for c in args.caps.split(",")]
    results = []
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        results, args.argv, args.rounds = saved["results"], saved["argv"], saved.get("rounds", args.rounds)
    for T in () if args.from_json else (int(t) for t in args.tokens.split(",")):
        log(f"T={T}")
        cfg, p = make_layer(T, args.hidden, args.inter, args.experts, args.topk)
        flops, info = flops_table(p, T, args.hidden, args.inter, args.experts, args.topk)
        log("  flops/ideal: " + ", ".join(f"{k} {v:.3f}" for k, v in flops.items()))
        cases = time_cases(cfg, p, args.rounds, caps)
        times = {c.key: (c.med, c.cpu_med, c.warm_s) for c in cases}
        for name, (wm, cm, _) in times.items():
            log(f"  {name:36s} wall {wm * 1e3:8.1f} ms  cpu {cm * 1e3:8.1f} ms")
        results.append(dict(T=T, flops=flops, info=info, times=times))
        del cases, p
    text = section(results, args)
    print(text)
    if args.out:
        _common.write_section(args.out, text, SECTION)  # from the heading to the next section
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": args.argv, "rounds": args.rounds, "results": results}, f, indent=1, default=float)


if __name__ == "__main__":
    main()
