"""Generation benchmark: jaxmoe.generate vs transformers `generate`, same config, same weights,
one process, interleaved rounds (the machine is shared: each number is a median, ratios pair
the runs of the same round).

    python bench/bench_generate.py --out BENCHMARKS.md

Greedy decoding of a batch of equal-length random prompts (no padding on either side):

  * prefill tokens/s: the prompt's forward that fills the cache (jaxmoe: the chunked absorbed
    prefill and the first token; transformers: `model(ids, use_cache=True)`);
  * decode tokens/s: the remaining new tokens of all rows (jaxmoe: the jitted decode steps;
    transformers: `generate(...)` minus its prefill, measured in the same round);
  * whether both produced the same tokens;
  * cache bytes per token (measured: jaxmoe's latent cache; transformers' DynamicCache after the
    prefill) and, for reference, a full per-head K/V cache, analytically, here and for V3-671B;
  * FP8-weight inference (`jaxmoe.quant.quantize_fp8` of the same model, bfloat16 compute):
    resident weight bytes vs bfloat16, decode tokens/s, logit deviation; the same for int8
    weight-only experts (float32 compute); and the weight bytes of V3-671B kept FP8 vs bf16.

jaxmoe runs float32 (the `--dtype` of both sides), compile time excluded (a warm-up call per
program); transformers uses sdpa attention and grouped_mm experts (its fastest CPU variant in
bench_model.py), `torch.set_num_threads(--threads)`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import _common  # noqa: E402
CONFIGS = _common.CONFIGS

MARK_BEGIN, MARK_END = "<!-- bench_generate:begin -->", "<!-- bench_generate:end -->"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ the sides
def jax_side(model, prompts, new):
    from jaxmoe.generate import engine

    def fn():
        g = engine.run(model, prompts, new, eos_id=None)
        return g.prefill_s, g.decode_s, g.tokens

    t = time.perf_counter()
    fn()  # compiles the prefill chunk and the decode step
    return fn, time.perf_counter() - t


def hf_side(hf, prompts, new):
    import torch

    ids = torch.tensor(prompts)

    def fn():
        with torch.no_grad():
            t0 = time.perf_counter()
            hf(ids, use_cache=True)
            t1 = time.perf_counter()
            # an explicit mask: generate() would otherwise take id 0 (the pad id) as padding
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=new, min_new_tokens=new, use_cache=True,
                              eos_token_id=None, pad_token_id=0)
            t2 = time.perf_counter()
        gen = t2 - t1
        return t1 - t0, gen - (t1 - t0), out[:, ids.shape[1]:].tolist()

    t = time.perf_counter()
    fn()
    return fn, time.perf_counter() - t


def hf_cache_bytes_per_token(hf, prompts) -> tuple[int, str]:
    import torch

    ids = torch.tensor(prompts)
    with torch.no_grad():
        out = hf(ids, use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    total, shapes = 0, None
    for layer in cache.layers:
        total += layer.keys.numel() * layer.keys.element_size()
        total += layer.values.numel() * layer.values.element_size()
        shapes = shapes or (tuple(layer.keys.shape), tuple(layer.values.shape))
    return total // ids.numel(), f"keys {list(shapes[0])}, values {list(shapes[1])} per layer"


def full_kv_bytes_per_token(cfg, itemsize: int) -> int:
    """A per-head K/V cache: K (qk_nope + qk_rope) and V (v_head_dim) for every head."""
    return cfg.num_hidden_layers * cfg.num_attention_heads * (
        cfg.qk_head_dim + cfg.v_head_dim) * itemsize


def v3_weight_bytes() -> dict:
    """V3-671B weight bytes (no MTP), abstract: all bf16 vs FP8 kept (+ float32 scales)."""
    import math

    from flax import nnx

    import jaxmoe
    from jaxmoe.hf_io import abstract_model
    from jaxmoe.quant.fp8 import _hf_shape, fp8_paths, scale_shape

    cfg = jaxmoe.deepseek_v3_671b().replace(num_nextn_predict_layers=0)
    shapes = {p: v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(abstract_model(cfg)))}
    fp8 = fp8_paths(cfg)
    bf16 = sum(2 * math.prod(s) for s in shapes.values())
    kept = 0
    for p, s in shapes.items():
        if p in fp8:
            n_lead = len(s) - (3 if fp8[p] in ("q_heads", "o_heads") else 2)
            hs = _hf_shape(s[n_lead:], fp8[p])
            kept += math.prod(s) + 4 * math.prod(s[:n_lead]) * math.prod(scale_shape(hs, (128, 128)))
        else:
            kept += 2 * math.prod(s)
    return {"bf16": bf16, "fp8": kept}


def forward_logits(model, tokens):
    """Full-forward logits [B, T, V] (float32 numpy) of the token array."""
    import jax
    import numpy as np
    from flax import nnx

    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    return np.asarray(fn(state, np.asarray(tokens, np.int32)), np.float32)


# ------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default=CONFIGS)
    ap.add_argument("--config", default="bench-small")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens per row")
    ap.add_argument("--new", type=int, default=32, help="new tokens per row")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--omp-wait-policy", default="PASSIVE",
                    help="OMP_WAIT_POLICY for torch (default PASSIVE: on a shared machine "
                         "spinning threads slow torch down many times)")
    ap.add_argument("--out", default=None, help="markdown file whose section is (re)written")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    if a.omp_wait_policy:
        os.environ["OMP_WAIT_POLICY"] = a.omp_wait_policy  # before torch starts its threads

    import numpy as np
    import torch
    import transformers

    import jaxmoe
    from jaxmoe.generate import engine
    from jaxmoe.quant import quantize_experts_int8, quantize_fp8, weight_bytes

    torch.set_num_threads(a.threads)
    kw = json.load(open(a.configs))["configs"][a.config]
    folder = tempfile.mkdtemp(prefix="bench-generate-")
    torch.manual_seed(0)
    transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**kw)).save_pretrained(folder)
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="sdpa",
        experts_implementation="grouped_mm").eval()
    model = jaxmoe.load_model(folder, dtype="float32", mtp=False)
    cfg = model.cfg
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, cfg.vocab_size, (a.batch, a.prompt)).tolist()
    B, P, N = a.batch, a.prompt, a.new
    log(f"{a.config}: batch {B} x prompt {P}, {N} new tokens; warming up")

    cases = {}
    for key, make in (("jaxmoe", lambda: jax_side(model, prompts, N)),
                      ("transformers", lambda: hf_side(hf, prompts, N))):
        fn, warm = make()
        cases[key] = {"fn": fn, "warm": warm, "prefill": [], "decode": [], "tokens": None}
        log(f"  {key}: first call {warm:.1f} s")
    for r in range(a.repeats):
        for key, c in cases.items():
            pre, dec, toks = c["fn"]()
            c["prefill"].append(pre)
            c["decode"].append(dec)
            c["tokens"] = toks
        log(f"  round {r + 1}/{a.repeats}: " + ", ".join(
            f"{k} prefill {c['prefill'][-1]:.3f}s decode {c['decode'][-1]:.3f}s"
            for k, c in cases.items()))
    jx, th = cases["jaxmoe"], cases["transformers"]
    same = jx["tokens"] == th["tokens"]
    ratio = {k: statistics.median(t / j for j, t in zip(jx[k], th[k])) for k in ("prefill", "decode")}

    # cache bytes per token
    ours = engine.cache_bytes_per_token(cfg)
    theirs, their_shapes = hf_cache_bytes_per_token(hf, prompts)
    full = full_kv_bytes_per_token(cfg, 4)
    v3 = jaxmoe.deepseek_v3_671b()
    v3_latent = engine.cache_bytes_per_token(v3, "bfloat16")
    v3_full = full_kv_bytes_per_token(v3, 2)

    # FP8 weights (bf16 compute) and int8 experts (f32 compute) on the same model
    log("  quantised variants")
    bf = jaxmoe.load_model(folder, dtype="bfloat16", mtp=False)
    fp = quantize_fp8(jaxmoe.load_model(folder, dtype="bfloat16", mtp=False))
    i8 = quantize_experts_int8(jaxmoe.load_model(folder, dtype="float32", mtp=False))
    variants = {}
    seq = np.concatenate([np.asarray(prompts), np.asarray(jx["tokens"])], axis=1)  # [B, P+N]
    ref_logits = forward_logits(model, seq)
    for key, m in (("bf16", bf), ("fp8", fp), ("int8", i8)):
        engine.run(m, prompts, N, eos_id=None)  # compile
        runs = [engine.run(m, prompts, N, eos_id=None) for _ in range(2)]
        # teacher-forced on the float32 model's sequence: per position max|diff| / max|ref|
        lg = forward_logits(m, seq)
        dev = np.abs(lg - ref_logits).max(-1) / np.abs(ref_logits).max(-1)  # [B, P+N]
        variants[key] = {"bytes": weight_bytes(m),
                         "decode_tok_s": statistics.median(B * r.decode_steps / r.decode_s
                                                           for r in runs),
                         "same_tokens": runs[-1].tokens == jx["tokens"],
                         "dev_median": float(np.median(dev)), "dev_p99": float(
                             np.percentile(dev, 99)),
                         "top1": float((lg.argmax(-1) == ref_logits.argmax(-1)).mean())}
    v3w = v3_weight_bytes()

    res = {
        "config": a.config, "batch": B, "prompt": P, "new": N, "repeats": a.repeats,
        "jaxmoe": {k: jx[k] for k in ("prefill", "decode")}, "jaxmoe_warm_s": jx["warm"],
        "transformers": {k: th[k] for k in ("prefill", "decode")},
        "same_tokens": same, "ratio": ratio, "cache": {
            "jaxmoe": ours, "transformers": theirs, "transformers_shapes": their_shapes,
            "full_kv": full, "v3_latent_bf16": v3_latent, "v3_full_kv_bf16": v3_full},
        "variants": variants, "f32_bytes": weight_bytes(model), "v3_weights": v3w,
        "seconds": time.perf_counter() - t_start,
    }
    text = section(a, res)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    if a.out:
        _common.write_section(a.out, text, MARK_BEGIN, MARK_END)
    return 0


def section(a, r) -> str:
    import flax
    import jax
    import torch
    import transformers

    B, P, N = r["batch"], r["prompt"], r["new"]
    med = statistics.median
    jx, th, c = r["jaxmoe"], r["transformers"], r["cache"]
    pre_j, pre_t = B * P / med(jx["prefill"]), B * P / med(th["prefill"])
    dec_j, dec_t = B * (N - 1) / med(jx["decode"]), B * (N - 1) / med(th["decode"])
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    cmd = "python bench/bench_generate.py " + " ".join(sys.argv[1:])
    v = r["variants"]
    gb = 1e9
    lines = [
        MARK_BEGIN,
        "## Generation",
        "",
        f"`{cmd}` — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{r['seconds'] / 60:.1f} min; {_common.cpu_model()}, {os.cpu_count()} CPUs "
        f"(shared; load average {load} at the end); jax {jax.__version__}, flax "
        f"{flax.__version__}, torch {torch.__version__} ({a.threads} threads, OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY', '(unset)')}), transformers "
        f"{transformers.__version__}, Python {platform.python_version()}.",
        "",
        f"Config `{r['config']}` (random weights, float32), batch {B} x {P} prompt tokens, {N} "
        f"new tokens per row, greedy; median of {r['repeats']} interleaved rounds, compile / "
        f"first call excluded (jaxmoe's first call, compiling the prefill chunk and the decode "
        f"step: {r['jaxmoe_warm_s']:.1f} s). transformers: `generate(do_sample=False)` with its "
        "cache, sdpa attention, grouped_mm experts.",
        "",
        "| | prefill tokens/s | decode tokens/s |",
        "|---|---:|---:|",
        f"| jaxmoe (absorbed MLA, latent cache) | {pre_j:,.0f} | {dec_j:,.1f} |",
        f"| transformers | {pre_t:,.0f} | {dec_t:,.1f} |",
        f"| jaxmoe / transformers (paired per round) | {r['ratio']['prefill']:.2f}x | "
        f"{r['ratio']['decode']:.2f}x |",
        "",
        f"Same greedy tokens on both sides: {'yes' if r['same_tokens'] else 'NO'}.",
        "",
        "Cache per token (all layers):",
        "",
        "| | bytes/token | vs full K/V |",
        "|---|---:|---:|",
        f"| jaxmoe latent cache (kv_lora_rank + rope dims, f32), measured | {c['jaxmoe']:,} | "
        f"{c['jaxmoe'] / c['full_kv']:.1%} |",
        f"| transformers {transformers.__version__} DynamicCache after the prefill, measured "
        f"({c['transformers_shapes']}) | {c['transformers']:,} | "
        f"{c['transformers'] / c['full_kv']:.1%} |",
        f"| full per-head K/V (heads x (qk_head_dim + v_head_dim), f32), analytic | "
        f"{c['full_kv']:,} | 100% |",
        f"| V3-671B latent, bf16 | {c['v3_latent_bf16']:,} | "
        f"{c['v3_latent_bf16'] / c['v3_full_kv_bf16']:.1%} |",
        f"| V3-671B full per-head K/V, bf16 | {c['v3_full_kv_bf16']:,} | 100% |",
        "",
        "transformers 5.x caches the same latents (it expands them into per-head K/V at every "
        "step instead of absorbing W_UK / W_UV), so its measured cache equals jaxmoe's; the full "
        "per-head K/V row is what older transformers and a naive MLA cache hold.",
        "",
        "Quantised weights on the same model (decode tokens/s: median of 2 runs; the logits "
        "are teacher-forced on the float32 model's prompt + greedy tokens: per position "
        "max|logits - float32 logits| / max|float32 logits|, median and 99th percentile over "
        "the positions, and how often the argmax agrees):",
        "",
        "| jaxmoe weights | compute | weight bytes | vs bf16 | decode tokens/s | greedy tokens "
        "= f32 | logit deviation median / p99 | argmax = f32 |",
        "|---|---|---:|---:|---:|---|---:|---:|",
        f"| float32 | float32 | {r['f32_bytes'] / 1e6:.1f} MB | "
        f"{r['f32_bytes'] / v['bf16']['bytes']:.2f} | {dec_j:,.1f} | — | — | — |",
    ]
    for key, name, comp in (("bf16", "bfloat16", "bfloat16"),
                            ("fp8", "FP8 e4m3 + 128x128 scales (`quantize_fp8`)", "bfloat16"),
                            ("int8", "int8 experts, float32 rest", "float32")):
        x = v[key]
        lines.append(f"| {name} | {comp} | {x['bytes'] / 1e6:.1f} MB | "
                     f"{x['bytes'] / v['bf16']['bytes']:.2f} | {x['decode_tok_s']:,.1f} | "
                     f"{'yes' if x['same_tokens'] else 'no'} | {x['dev_median']:.1e} / "
                     f"{x['dev_p99']:.1e} | {x['top1']:.1%} |")
    w = r["v3_weights"]
    lines += [
        "",
        f"V3-671B (no MTP) weights, from the parameter shapes: bf16 {w['bf16'] / gb:,.0f} GB, "
        f"FP8 kept (e4m3 + float32 scales; embeddings, norms, router, LM head bf16) "
        f"{w['fp8'] / gb:,.0f} GB = {w['fp8'] / w['bf16']:.2f} of bf16.",
        "",
        "The FP8 weights are dequantised per layer inside the scanned stack (one layer's "
        "weights exist dequantised at a time): on this CPU that costs decode speed against "
        "plain bf16 weights; what it buys is the resident bytes. bfloat16 matmuls are slow on "
        "this CPU (no native bf16 dot). The model is random (initializer_range 0.02): its "
        "router scores are nearly tied and small weight changes flip expert choices, which the "
        "p99 deviation and the free-running tokens show. The FP8 row's deviation is the cost "
        "of rounding these float32 weights to e4m3 (3 mantissa bits), not of the FP8 path: "
        "with a checkpoint's own FP8 weights the kept path gives the dequantised model's "
        "weights bit for bit and its logits within bfloat16 rounding (tests/test_quant.py).",
        MARK_END,
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
