"""bench_model.py's report: the per-config rows and the matmul rate from the timed cases, the
BENCHMARKS.md section (markdown) and the raw-timings JSON."""

from __future__ import annotations

from _common import Case, paired
from model_cases import MM_N, TORCH_THREADS, TRAIN_BACK_TO_BACK

MARK_BEGIN = "<!-- bench_model:begin -->"
MARK_END = "<!-- bench_model:end -->"


def summarize(res: dict, mm_cases: list) -> None:
    """res["matmul"] (the machine's f32 matmul rate: the larger median of jax and torch) and each
    config's table rows (with MFU against that rate and speed against the fastest transformers)."""
    from jaxmoe.layers.moe import resolve_impl
    mmj, mmt = mm_cases
    mm = {"jax": mmj.flops / mmj.med / 1e9, "torch": mmt.flops / mmt.med / 1e9,
          "jax_best": mmj.flops / mmj.best / 1e9, "torch_best": mmt.flops / mmt.best / 1e9,
          "jax_cores": mmj.cpu_med / mmj.med, "torch_cores": mmt.cpu_med / mmt.med}
    mm["rate"] = max(mm["jax"], mm["torch"])
    res["matmul"] = mm
    rate = mm["rate"] * 1e9
    for name, cr in res["configs"].items():
        rows = []
        for step, jd, hd in (("forward", cr["jf"], cr["hf_f"]), ("train step", cr["jt"], cr["hf_t"])):
            best_hf = min(hd.values(), key=lambda c: c.med)
            for impl, c in jd.items():
                rw, rc = paired(best_hf, c)
                rows.append({"step": step, "impl": f"jaxmoe {resolve_impl(impl)}", "case": c,
                             "ratio": f"{rw:.2f}x ({rc:.2f}x)"})
                if step == "train step" and c is jd[next(iter(jd))]:
                    cr["train_ratio"] = (rw, rc)
                if step == "forward" and c is jd[next(iter(jd))]:
                    cr["fwd_ratio"] = (rw, rc)
            for v, c in hd.items():
                rows.append({"step": step, "impl": f"transformers {v}" + (" (reference)" if c is best_hf else ""),
                             "case": c, "ratio": ""})
        for r in rows:
            c = r.pop("case")
            r.update(med=c.med, best=c.best, cpu=c.cpu_med, tok_s=c.tokens / c.med,
                     gflops=c.flops / c.med / 1e9, mfu=c.flops / c.med / rate, warm=c.warm_s)
        cr["rows"] = rows


def fmt(x, nd=1):
    return f"{x:,.{nd}f}"


def render(res: dict) -> str:
    L = [MARK_BEGIN, "## Model benchmark: jaxmoe vs transformers on CPU (float32)\n"]
    env = res["env"]
    L.append(f"Command (repository root): `{res['command']}` — {res['elapsed_min']:.1f} min.\n")
    L.append(f"- Date: {res['date']}; jaxmoe git {env['git']} (dispatch.py sha256 {env['dispatch_sha']})")
    L.append(f"- Machine: {env['nproc']} CPU cores (nproc), {env['cpu']} ({env['flags']}), "
             f"{env['mem_gb']} GB RAM; shared with other jobs: load average {env['load_start']} at "
             f"start, {env['load_end']} at end (1/5/15 min). Absolute numbers vary with that load; "
             "the comparison is interleaved, so ratios are more stable than rates.")
    L.append("- Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    L.append(f"- Threads: torch.set_num_threads({TORCH_THREADS}), OMP_WAIT_POLICY={env['omp']} "
             "(with the default busy-waiting OpenMP, 2-thread torch on this shared 2-core machine ran "
             "3-5x slower than with passive waiting); XLA:CPU default thread pool (2 cores).")
    L.append(f"- Batch {res['batch']} x seq {res['seq']} = {res['batch'] * res['seq']} tokens per step. Each "
             f"case is warmed up (compile / first call reported apart) and timed in up to {res['repeats']} "
             "interleaved rounds (jaxmoe ragged_dot and dense: 1 round; the profile: "
             f"{res['profile_repeats']} rounds); in each round a train step runs {TRAIN_BACK_TO_BACK} "
             "times in a row and the last is timed (training steps follow each other; the first "
             "XLA step after torch steps pays for re-faulting its buffers). "
             "Time = median wall seconds (best in brackets); CPU = median process CPU seconds (all "
             "threads) of the same runs, which the other jobs disturb much less than wall time; "
             "cores = CPU / wall (at most 2; below 2 when the step leaves a core idle or the other "
             "jobs take it).")
    mm = res["matmul"]
    L.append(f"- f32 matmul rate ({MM_N}^3, in the same rounds): jax.jit(jnp.dot) {fmt(mm['jax'])} GFLOP/s "
             f"({mm['jax_cores']:.2f} cores), torch.mm {fmt(mm['torch'])} GFLOP/s ({mm['torch_cores']:.2f} cores); "
             f"**machine f32 matmul rate = {fmt(mm['rate'])} GFLOP/s** (the larger; best single runs "
             f"{fmt(mm['jax_best'])} / {fmt(mm['torch_best'])}). MFU = achieved model GFLOP/s (median "
             "wall) / that rate. The rate is measured under the same load as the steps, so it drops "
             "with the load; divide MFU by best/median of the matmul rate for a figure against "
             "the best single matmul run (cases that ran in a quieter moment can exceed 100%).")
    L.append("- Model FLOPs (analytic; `model_flops` in bench/model_flops.py): forward = 2 x (weights each token "
             "is multiplied through: MLA q_a/q_b/kv_a/kv_b/o projections, router, K routed + shared "
             "experts or the dense SwiGLU, LM head) + attention, per token per layer, "
             "2*S*N*(qk_nope+qk_rope) for QK^T and 2*S*N*v_head_dim for PV with S = (T+1)/2 (the "
             "causal half). jaxmoe computes the full T x T score square (2x that term); transformers' "
             "sdpa runs is_causal. Training = 3 x forward. Norms, softmax, rope and the optimizer are "
             "not counted.")
    L.append(f"- transformers default implementations: attention {res['hf_default'][0]!r}, experts "
             f"{res['hf_default'][1]!r}. Measured variants: attention sdpa/eager x experts "
             "grouped_mm/eager (eager/eager skipped); the fastest median is the reference. "
             "`batched_mm` experts were 57-82 s per bench-small forward in a trial (vs ~0.6 s) and are "
             "not run.\n")
    for name, cr in res["configs"].items():
        fl = cr["flops"]
        L.append(f"### {name}\n")
        L.append(f"{fmt(fl['params_excl_norms'] / 1e6, 2)}M parameters without norms (transformers "
                 f"counts {fmt(cr['hf_params'] / 1e6, 2)}M), {fmt(fl['active_matmul_params'] / 1e6, 2)}M "
                 f"active matmul parameters per token. Forward {fmt(fl['fwd'] / 1e6, 2)} MFLOP/token "
                 f"(matmuls {fmt(fl['matmul_fwd'] / 1e6, 2)}, of which routed experts "
                 f"{fmt(fl['routed_fwd'] / 1e6, 2)}; causal attention {fmt(fl['attn_fwd'] / 1e6, 2)}), "
                 f"training {fmt(fl['train'] / 1e6, 2)} MFLOP/token. Logits max |jaxmoe - "
                 f"transformers| = {cr['logits_maxdiff']:.1e}.\n")
        L.append("Speed vs transformers = median over rounds of (transformers reference time / jaxmoe "
                 "time) in the same round, wall (CPU); > 1 means jaxmoe is faster.\n")
        L.append("| step | implementation | time s | CPU s | cores | tokens/s | GFLOP/s | MFU | "
                 "speed vs transformers: wall (CPU) | compile (jax) / first call s |")
        L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for row in cr["rows"]:
            L.append(f"| {row['step']} | {row['impl']} | {row['med']:.3f} ({row['best']:.3f}) | "
                     f"{row['cpu']:.3f} | {row['cpu'] / row['med']:.2f} | "
                     f"{fmt(row['tok_s'], 0)} | {fmt(row['gflops'])} | {100 * row['mfu']:.1f}% | "
                     f"{row['ratio']} | {row['warm']:.1f} |")
        L.append("")
    p = res.get("profile")
    if p:
        L.append(f"### Profile ({p['config']})\n")
        L.append("**One layer, jaxmoe vs transformers** (same weights; input [8, 256, D] random; "
                 "fwd+bwd = grads of the input and the layer's weights of sum(y^2)/2; the MoE layer "
                 "includes router + routed + shared experts; FLOPs as in the model count; MFU against "
                 f"the f32 matmul rate re-measured in these rounds, {fmt(p['layers_rate'] / 1e9)} GFLOP/s).\n")
        L.append("| layer | implementation | time ms | CPU ms | GFLOP/s | MFU | compile / first call s |")
        L.append("|---|---|---:|---:|---:|---:|---:|")
        for c in p["layers"]:
            what, impl = c.key.split(" | ")
            L.append(f"| {what} | {impl} | {1e3 * c.med:.1f} ({1e3 * c.best:.1f}) | {1e3 * c.cpu_med:.1f} | "
                     f"{fmt(c.flops / c.med / 1e9)} | {100 * c.flops / c.med / p['layers_rate']:.1f}% | "
                     f"{c.warm_s:.2f} |")
        d = p["dispatch_info"]
        L.append(f"\n**Routed experts alone** (M = {d['M']} tokens, K = {d['K']}, E = {d['E']}; routing "
                 "= the first MoE layer's router on RMS-normalised token embeddings, tokens per "
                 f"expert {d['counts'][0]}..{d['counts'][1]}"
                 + (f"; the segment loop multiplies {d['rows']} rows for {d['M'] * d['K']} (token, "
                    "expert) pairs" if "rows" in d else "")
                 + f"). Routed forward = {fmt(d['routed_flops'] / 1e9, 2)} GFLOP, fwd+bwd 3x. "
                 f"max |jaxmoe segment - transformers experts| = {d['maxdiff']:.1e}. MFU against the f32 "
                 f"matmul rate re-measured in these rounds, {fmt(d['rate'] / 1e9)} GFLOP/s. XLA cost_analysis "
                 "counts a loop body once, so it undercounts the expert loop.\n")
        L.append("| case | time ms | CPU ms | GFLOP/s | MFU | XLA cost_analysis GFLOP | compile s |")
        L.append("|---|---:|---:|---:|---:|---:|---:|")
        for c in p["dispatch"]:
            xf = c.meta.get("xla_flops")
            g = f"{fmt(c.flops / c.med / 1e9)}" if c.flops else "-"
            mfu = f"{100 * c.flops / c.med / d['rate']:.1f}%" if c.flops else "-"
            L.append(f"| {c.key} | {1e3 * c.med:.1f} ({1e3 * c.best:.1f}) | {1e3 * c.cpu_med:.1f} | {g} | {mfu} | "
                     f"{'-' if xf is None else fmt(xf / 1e9, 2)} | {c.warm_s:.2f} |")
        for label, a in p.get("attribution", {}).items():
            if not a:
                continue
            tot = sum(v for _, v in a["components"])
            L.append(f"\n**XLA thunk time of the jaxmoe {label}** (jax.profiler trace; "
                     f"{a['wall_ms']:.0f} ms wall per step while traced, {tot:.0f} ms of thunk time "
                     f"summed over threads, {a['thunks_per_step']:.0f} thunks per step; attributed to "
                     "the innermost jaxmoe stack frame of each HLO instruction; backward ops carry the "
                     "frame of their forward op). Matmul share: "
                     + ", ".join(f"{k} {100 * v / tot:.0f}%" for k, v in a["kinds"]) + ".\n")
            L.append("| component | ms/step | share |")
            L.append("|---|---:|---:|")
            for k, v in a["components"]:
                L.append(f"| {k} | {v:.0f} | {100 * v / tot:.1f}% |")
            L.append("\nTop source functions: " + ", ".join(f"`{k}` {v:.0f} ms" for k, v in a["functions"][:8]) + ".")
        L.append("")
    L.append(MARK_END)
    return "\n".join(L)


def to_json(o):
    """res with every Case as its raw timings, made JSON-serialisable."""
    if isinstance(o, Case):
        return {"key": o.key, "times": o.times, "cpu": o.cpu, "warm_s": o.warm_s, "tokens": o.tokens,
                "flops": o.flops}
    if isinstance(o, dict):
        return {str(k): to_json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [to_json(v) for v in o]
    return o if isinstance(o, (int, float, str, type(None), bool)) else str(o)
