"""Fine-tuning recipes benchmark (issue #8), two parts, written to BENCHMARKS.md:

1. LoRA vs full fine-tuning: the trainer's step (`StepFns.train_step`, jitted, state donated) on
   the ~50M `bench-small` config (shared/bench/bench_configs.json, batch 8 x 256), full
   fine-tuning vs LoRA rank 16 / alpha 32 / dropout 0.1 on the MLA projections (the guide's
   defaults) and vs LoRA also on the routed + shared experts; median step time over interleaved
   rounds, tokens/s, and memory from XLA's compiled memory analysis (arguments = the train
   state + batch, temporaries = the step's peak working set) plus the train-state bytes.
2. Top-p vs top-k routing: two short `jaxmoe-train` runs of the `tiny` preset on the built-in
   corpus (same seed, data and steps), plain top-2 vs dynamic top-p (p 0.7, 1..4 experts);
   loss, held-out loss and mean experts per token.

    python bench/bench_finetune.py --out BENCHMARKS.md            # both parts (CPU: ~30 min)
    python bench/bench_finetune.py --part lora --repeats 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
CONFIGS = _common.CONFIGS

MARK_BEGIN, MARK_END = "<!-- bench_finetune:begin -->", "<!-- bench_finetune:end -->"


def lora_cases(kw: dict, B: int, T: int, log):
    """{name: (step fn, compiled memory stats, state bytes, trained params)}."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import jaxmoe
    from jaxmoe import lora
    from jaxmoe.train.config import LossSection, OptimSection
    from jaxmoe.train.optim import make_optimizer
    from jaxmoe.train.step import StepFns
    from jaxmoe.train.state import host_init, split_model

    mcfg = jaxmoe.ModelConfig.from_hf_config(kw, num_nextn_predict_layers=0)
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    rep, bsh = NamedSharding(mesh, P()), NamedSharding(mesh, P(None, "data"))
    rng = np.random.RandomState(0)
    tok = rng.randint(0, mcfg.vocab_size, (1, B, T + 1)).astype(np.int32)
    batch = jax.device_put({"tokens": tok, "segments": np.ones_like(tok), "positions":
                            np.broadcast_to(np.arange(T + 1, dtype=np.int32), tok.shape).copy()}, bsh)
    variants = {"full fine-tuning": None,
                "LoRA r16 (MLA projections)": lora.DEFAULT_TARGETS,
                "LoRA r16 (MLA + routed and shared experts)": lora.DEFAULT_TARGETS + ("experts", "shared")}
    out = {}
    for name, targets in variants.items():
        def build():
            m = jaxmoe.DeepseekV3(mcfg, rngs=nnx.Rngs(0))
            if targets:
                lora.attach(m, lora.LoraSpec(16, 32.0, 0.1, targets), jax.random.key(1))
            return m

        graphdef, abstract = split_model(nnx.eval_shape(build))
        parts = jax.device_put(host_init(abstract, mcfg, 0), rep)
        tx, lr = make_optimizer(OptimSection(lr=1e-4), 1000)
        fns = StepFns(graphdef, mcfg, LossSection(mtp_weight=0.0), tx, lr, 1000,
                      lora=targets is not None, lora_dropout=0.1)
        state = jax.jit(lambda p: dict(p, opt=tx.init(p["params"]), rng=jax.random.PRNGKey(0),
                                       step=jnp.zeros((), jnp.int32)), out_shardings=rep)(parts)
        t = time.perf_counter()
        compiled = jax.jit(fns.train_step, donate_argnums=(0,),
                           out_shardings=(rep, rep)).lower(state, batch).compile()
        warm = time.perf_counter() - t
        mem = compiled.memory_analysis()
        nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa
        info = {"trained": sum(x.size for x in jax.tree.leaves(state["params"])),
                "state_bytes": nbytes(state), "opt_bytes": nbytes(state["opt"]),
                "temp_bytes": getattr(mem, "temp_size_in_bytes", None),
                "arg_bytes": getattr(mem, "argument_size_in_bytes", None), "compile_s": warm}
        box = {"s": state}

        def fn(box=box, compiled=compiled):
            box["s"], m = compiled(box["s"], batch)
            return float(m["loss"])

        fn()
        log(f"  {name}: compile {warm:.1f}s, {info['trained']:,} trained params, state "
            f"{info['state_bytes'] / 2**20:.0f} MiB, temp {(info['temp_bytes'] or 0) / 2**20:.0f} MiB")
        out[name] = (fn, info)
    return out, mcfg


def run_lora(args, log) -> dict:
    with open(args.configs) as f:
        spec = json.load(f)
    kw = spec["configs"][args.config]
    B, T = int(spec["batch"]), int(spec["seq"])
    cases, mcfg = lora_cases(kw, B, T, log)
    times = {k: [] for k in cases}
    for r in range(args.repeats):
        for k, (fn, _) in cases.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
        log(f"  round {r + 1}/{args.repeats}: " + ", ".join(f"{v[-1]:.2f}s" for v in times.values()))
    return {"config": args.config, "B": B, "T": T,
            "cases": {k: dict(info, med=statistics.median(times[k]), times=times[k])
                      for k, (_, info) in cases.items()}}


def run_topp(args, log) -> dict:
    import numpy as np

    from jaxmoe.train import trainer
    from jaxmoe.train.flags import parse_args
    from jaxmoe.train.metrics import read_metrics

    base = ["--config", "tiny", "--steps", str(args.steps), "--loss.mtp_weight", "0",
            "--log.every", "50", "--log.eval_every", "0", "--ckpt.every", "0",
            "--log.sample_bytes", "0", "--log.tensorboard", "false"]
    runs = {"top-k (K=2)": "",
            f"top-p (p={args.top_p}, 1..4 experts)":
                f"router_top_p={args.top_p},router_min_k=1,router_max_k=4"}
    out = {}
    for name, over in runs.items():
        wd = tempfile.mkdtemp(prefix="bench_topp_")
        cfg = parse_args(base + ["--workdir", wd] + (["--model.overrides", over] if over else []))
        log(f"  {name}: {args.steps} steps of tiny in {wd}")
        t = time.perf_counter()
        trainer.run(cfg)
        recs = read_metrics(os.path.join(wd, "metrics.jsonl"))
        loss = np.array([r["loss"] for r in recs])
        ept = np.array([np.mean(r["experts_per_token"]) for r in recs])
        tps = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r]
        out[name] = {"loss_first20": float(loss[:20].mean()), "loss_last20": float(loss[-20:].mean()),
                     "eval_loss": next(r["eval_loss"] for r in reversed(recs) if "eval_loss" in r),
                     "ept_first20": float(ept[:20].mean()), "ept_last20": float(ept[-20:].mean()),
                     "tokens_per_s": float(np.median(tps)), "wall_s": time.perf_counter() - t}
        log(f"  {name}: {out[name]}")
    return {"steps": args.steps, "runs": out}


def render(res: dict) -> str:
    L = [MARK_BEGIN, "## Fine-tuning recipes", ""]
    L.append(f"`{res['command']}` — {res['date']}; {res['device']}; jax {res['jax']}. "
             f"Load average {res['load'][0]} at the start, {res['load'][1]} at the end (a shared "
             "machine: absolute times are noisy, ratios measured in interleaved rounds less so).\n")
    if "lora" in res:
        r = res["lora"]
        L.append(f"### LoRA vs full fine-tuning (`{r['config']}`, batch {r['B']} x {r['T']}, "
                 "float32)\n")
        L.append("One trainer step (forward, CE + balance loss, backward, clipping, AdamW; LoRA: "
                 "adapter dropout, base frozen, no router-bias update), random base weights. "
                 "Memory from XLA's compiled memory analysis of the step: the train state "
                 "(parameters, frozen base, AdamW moments) is its input, donated; "
                 "temporaries = the step's working set.\n")
        L.append("| step | trained params | ms | tokens/s | vs full | train state MiB | AdamW "
                 "state MiB | temporaries MiB |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        full = r["cases"].get("full fine-tuning")
        for k, c in r["cases"].items():
            tps = r["B"] * r["T"] / c["med"]
            ratio = f"{full['med'] / c['med']:.2f}x" if full else ""
            L.append(f"| {k} | {c['trained']:,} | {1e3 * c['med']:.0f} | {tps:,.0f} | {ratio} | "
                     f"{c['state_bytes'] / 2**20:.0f} | {c['opt_bytes'] / 2**20:.1f} | "
                     f"{(c['temp_bytes'] or 0) / 2**20:.0f} |")
        L.append("\nThe adapters are applied in weight space (W + (alpha/r) A B inside the step), "
                 "so the backward still forms each adapted weight's full gradient dW before "
                 "projecting it onto A and B: LoRA saves the gradients and AdamW work of the "
                 "frozen weights (embedding, LM head, experts when not adapted) and the AdamW "
                 "state, not the matmul FLOPs of the adapted projections.\n")
    if "topp" in res:
        r = res["topp"]
        L.append(f"### Top-p vs top-k routing (`tiny` preset, {r['steps']} steps on the "
                 "built-in corpus)\n")
        L.append("`jaxmoe-train --config tiny --steps N --loss.mtp_weight 0` and the same with "
                 "`--model.overrides router_top_p=...,router_min_k=1,router_max_k=4` (8 experts, "
                 "groups of 4 with 1 kept: at most 4 candidates). Losses in nats per byte; "
                 "experts per token averaged over the MoE layers.\n")
        L.append("| routing | train loss, first 20 steps | train loss, last 20 | held-out loss "
                 "(end) | experts/token, first 20 | experts/token, last 20 | tokens/s |")
        L.append("|---|---:|---:|---:|---:|---:|---:|")
        for k, c in r["runs"].items():
            L.append(f"| {k} | {c['loss_first20']:.3f} | {c['loss_last20']:.3f} | "
                     f"{c['eval_loss']:.3f} | {c['ept_first20']:.2f} | {c['ept_last20']:.2f} | "
                     f"{c['tokens_per_s']:,.0f} |")
    L.append(MARK_END)
    return "\n".join(L)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("all", "lora", "topp"), default="all")
    ap.add_argument("--config", default="bench-small")
    ap.add_argument("--configs", default=CONFIGS)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=300, help="top-p vs top-k: steps per run")
    ap.add_argument("--top-p", type=float, default=0.7)
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    _common.quiet_env()
    import jax

    log = _common.elapsed_logger()

    dev = jax.devices()[0]
    res = {"command": "python bench/bench_finetune.py" + "".join(
               f" {a}" for a in (argv if argv is not None else sys.argv[1:])),
           "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
           "device": (f"{_common.cpu_model()}, {os.cpu_count()} CPUs" if dev.platform == "cpu"
                      else f"{len(jax.devices())} x {dev.device_kind}"),
           "jax": jax.__version__, "load": [" ".join(f"{x:.1f}" for x in os.getloadavg())]}
    if args.part in ("all", "lora"):
        log("LoRA vs full fine-tuning")
        res["lora"] = run_lora(args, log)
    if args.part in ("all", "topp"):
        log("top-p vs top-k")
        res["topp"] = run_topp(args, log)
    res["load"].append(" ".join(f"{x:.1f}" for x in os.getloadavg()))
    text = render(res)
    print("\n" + text)
    if args.out:
        _common.write_section(args.out, text, MARK_BEGIN, MARK_END)
        log(f"wrote {args.out}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
