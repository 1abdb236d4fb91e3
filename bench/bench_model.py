"""CPU benchmark: jaxmoe DeepseekV3 vs transformers DeepseekV3ForCausalLM, identical weights.

    python bench/bench_model.py --out BENCHMARKS.md

Everything is measured in one process with the cases interleaved round by round (the machine
is shared with other jobs, so each number is the median over the rounds; compile / first-call
time is excluded and reported apart):

  * forward tokens/s (logits of the whole batch): jax.jit of the functional forward
    (`nnx.merge(graphdef, state)(tokens)`) vs transformers under torch.no_grad;
  * training step tokens/s: forward + mean next-token cross-entropy + backward + AdamW
    (optax.adamw inside one jitted step with donated params/optimizer state; torch.optim.AdamW);
  * the machine's float32 matmul rate (jitted jnp.dot and torch.mm, 2048^3) in the same rounds;
    the larger median is "the machine's f32 matmul rate" used for MFU;
  * analytic model FLOPs per token (see `model_flops.py`) -> achieved GFLOP/s and MFU;
  * jaxmoe with the moe_impl variants of `--impls` on `--impl-config` (default bench-small;
    "pallas" is not run by default: on the CPU it is Pallas interpret mode);
  * transformers with sdpa/eager attention x grouped_mm/eager experts; the fastest is the
    reference of the "vs transformers" column;
  * a profile (`--no-profile` skips it): per-layer jaxmoe vs transformers (attention, MoE,
    dense MLP, LM head + loss), the routed-expert dispatch against a dense SwiGLU of equal FLOPs,
    and the XLA thunk time of the jaxmoe steps attributed to jaxmoe source functions.

The weights: a transformers model (torch.manual_seed(0)) is saved with save_pretrained to a
temporary folder and loaded by `jaxmoe.load_model`, so both sides run identical weights.

This file runs the benchmark; the parts live beside it: model_cases.py (what is timed),
model_flops.py, model_profile.py, xla_attribution.py, model_env.py and render_model.py (the
report); the timed case and its rounds are _common.py's.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import model_env  # noqa: E402
import model_profile  # noqa: E402
import xla_attribution  # noqa: E402
from _common import Case, run_rounds, timed  # noqa: E402
from model_cases import (HF_VARIANTS, SLOW_REPEATS, TORCH_THREADS, TRAIN_BACK_TO_BACK,  # noqa: E402
                         build_hf, hf_fwd_fn, hf_train_fn, jax_fwd_case, jax_train_case, load_hf,
                         matmul_cases)
from model_flops import model_flops  # noqa: E402
from render_model import MARK_BEGIN, MARK_END, render, summarize, to_json  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=_common.CONFIGS, help="bench_configs.json (default: %(default)s)")
    ap.add_argument("--names", default=None, help="comma-separated config names (default: all in the file)")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds per case (default 5)")
    ap.add_argument("--impls", default="segment,ragged_dot,dense", help="moe_impl variants for --impl-config")
    ap.add_argument("--impl-config", default="bench-small", help="config that runs every moe_impl")
    ap.add_argument("--no-profile", action="store_true", help="skip the layer / dispatch / trace profile")
    ap.add_argument("--profile-repeats", type=int, default=3, help="timed rounds of the profile (default 3)")
    ap.add_argument("--omp-wait-policy", default="PASSIVE", help="OMP_WAIT_POLICY for torch (default PASSIVE)")
    ap.add_argument("--out", default=None, help="markdown file whose bench_model section is (re)written")
    ap.add_argument("--json", default=None, help="also dump raw timings here")
    args = ap.parse_args(argv)

    # before torch / jax are imported
    _common.quiet_env(cpu=True)
    if args.omp_wait_policy:
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(TORCH_THREADS)
    t_start = time.perf_counter()
    log = _common.elapsed_logger()

    with open(args.configs) as f:
        spec = json.load(f)
    B, T = int(spec["batch"]), int(spec["seq"])
    if spec.get("dtype", "float32") != "float32":
        raise SystemExit("this benchmark runs float32 only")
    names = args.names.split(",") if args.names else list(spec["configs"])
    impls = [s for s in args.impls.split(",") if s]
    ntok = B * T
    env = model_env.environment()
    log(f"jax {jax.__version__} on {jax.devices()}; torch threads {torch.get_num_threads()}; "
        f"OMP_WAIT_POLICY={env['omp']}")
    cmd = "python bench/bench_model.py" + ("".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])))
    res = {"batch": B, "seq": T, "repeats": args.repeats, "configs": {}, "env": env, "command": cmd,
           "profile_repeats": args.profile_repeats,
           "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")}
    default_model = transformers.DeepseekV3ForCausalLM(
        transformers.DeepseekV3Config(**spec["configs"][names[0]]))
    res["hf_default"] = (default_model.config._attn_implementation, default_model.config._experts_implementation)
    del default_model

    tmp_root = tempfile.mkdtemp(prefix="bench_model_")
    folders, hf_params = {}, {}
    for name in names:
        folders[name] = os.path.join(tmp_root, name)
        hf_params[name] = build_hf(spec["configs"][name], folders[name])

    mm_cases = matmul_cases()
    rng = np.random.RandomState(0)
    for name in names:
        kw = spec["configs"][name]
        fl = model_flops(kw, T)
        tok = rng.randint(0, kw["vocab_size"], (B, T))
        tok_j, tok_t = jnp.asarray(tok.astype(np.int32)), torch.from_numpy(tok.astype(np.int64))
        folder = folders[name]
        run_impls = impls if name == args.impl_config else ["auto"]
        log(f"{name}: compiling jaxmoe ({', '.join(run_impls)})")
        jf, jt = {}, {}
        for impl in run_impls:
            reps = SLOW_REPEATS.get(impl)
            jf[impl] = jax_fwd_case(f"jax fwd {impl}", folder, impl, tok_j, ntok, fl["fwd"] * ntok, reps)
            jt[impl] = jax_train_case(f"jax train {impl}", folder, impl, tok_j, ntok, fl["train"] * ntok, reps)
            for c in (jf[impl], jt[impl]):  # compiled ahead of time: no warm-up run needed
                log(f"  {c.key}: compile {c.warm_s:.1f}s")
        hf_f, hf_t = {}, {}
        for attn, ex in HF_VARIANTS:
            reps = SLOW_REPEATS.get((attn, ex))
            v = f"{attn}/{ex}"
            hf_f[v] = Case(f"hf fwd {v}", hf_fwd_fn(load_hf(folder, attn, ex, False), tok_t), ntok,
                           fl["fwd"] * ntok, reps)
            hf_t[v] = Case(f"hf train {v}", hf_train_fn(load_hf(folder, attn, ex, True), tok_t), ntok,
                           fl["train"] * ntok, reps)
            for c in (hf_f[v], hf_t[v]):
                _, c.warm_s = timed(c.fn)
        for c in list(jt.values()) + list(hf_t.values()):
            # a training run's steps follow each other; the first XLA step after torch steps
            # (and the reverse) pays for re-faulting its buffers
            c.back_to_back = TRAIN_BACK_TO_BACK
        ref = hf_f["sdpa/grouped_mm"].fn().numpy()
        maxdiff = max(float(np.abs(jf[i].meta["logits"]() - ref).max()) for i in run_impls)
        cases = list(mm_cases) + list(jf.values()) + list(hf_f.values()) + list(jt.values()) + list(hf_t.values())
        log(f"{name}: {args.repeats} rounds")
        run_rounds(cases, args.repeats, log)
        res["configs"][name] = {"flops": fl, "hf_params": hf_params[name], "logits_maxdiff": maxdiff,
                                "jf": jf, "jt": jt, "hf_f": hf_f, "hf_t": hf_t}
        if not args.no_profile and name == args.impl_config:
            # trace attribution of the default-impl steps, while their compiled executables exist
            d0 = run_impls[0]
            log(f"{name}: tracing jaxmoe steps ({d0})")
            att = res.setdefault("attribution", {})
            att[f"forward ({d0})"] = xla_attribution.attribute(jf[d0].meta["compiled"], jf[d0].fn, 3, log)
            att[f"train step ({d0})"] = xla_attribution.attribute(jt[d0].meta["compiled"], jt[d0].fn, 2, log)
        for c in list(jf.values()) + list(jt.values()):
            c.meta.pop("compiled", None)
            c.meta.pop("logits", None)
        gc.collect()

    summarize(res, mm_cases)

    if not args.no_profile:
        pname = args.impl_config if args.impl_config in names else names[-1]
        pkw, pdir, prep = spec["configs"][pname], folders[pname], args.profile_repeats
        log(f"profile on {pname}: layers")
        layers, layers_rate = model_profile.profile_layers(pkw, pdir, B, T, impls[:1], prep, log)
        log(f"profile on {pname}: routed-expert dispatch")
        disp, dinfo = model_profile.profile_dispatch(pkw, pdir, B, T, prep, log)
        res["profile"] = {"config": pname, "layers": layers, "layers_rate": layers_rate, "dispatch": disp,
                          "dispatch_info": dinfo,
                          "attribution": res.get("attribution", {})}

    env["load_end"] = model_env.load_avg()
    res["elapsed_min"] = (time.perf_counter() - t_start) / 60
    text = render(res)
    print("\n" + text)
    if args.out:
        _common.write_section(args.out, text, MARK_BEGIN, MARK_END)
        log(f"wrote {args.out}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(res), f, indent=1)
    shutil.rmtree(tmp_root, ignore_errors=True)
    log(f"done in {time.perf_counter() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
