"""`jaxmoe-plan`: per-device memory of one training step of a model on a mesh preset, and whether
it fits the chip's HBM - without the chips.

    jaxmoe-plan --model deepseek_v3_671b --mesh v5p-1024
    jaxmoe-plan --model tiny --mesh cpu-8 --seq 64

Method (BENCHMARKS.md "Memory plan"):
- Parameters, optimizer state (AdamW mu, nu, count) and gradients are counted exactly from the
  abstract train state of the FULL model: every leaf's per-device shard shape under the preset's
  rules (jaxmoe.parallel.sharding) times its item size. Gradients have the parameters' shapes,
  shardings and dtype.
- Activations and temporaries come from XLA: the jaxmoe-train step (loss, backward, global-norm
  clip, AdamW, bias update; state donated) is lowered against abstract arrays on the preset's
  mesh and compiled; `memory_analysis().temp_size_in_bytes` is the per-device scratch of the
  SPMD-partitioned program, which includes the gradients: activations = temp - gradients.
  Compiling 61 layers on hundreds of devices is slow, so the step is compiled with two dense
  and two MoE layers (a one-layer scan is unrolled by XLA and assigns buffers differently) and
  scaled up: with remat (the default) every further layer of the scanned
  stacks keeps exactly one more [rows, T, D] input for the backward pass (its recompute and
  backward reuse the one transient peak the compile already holds), so activations = compiled
  (2, 2) figure + (layers - 4) x that input. Without remat, (1, 1), (1, 2) and (2, 1) are
  compiled and a linear fit c + a * dense + b * MoE is evaluated at the full counts.
  BENCHMARKS.md records a check of the scale-up against a direct compile.
- Without enough devices (a CPU host), the command re-runs itself in a subprocess with
  XLA_FLAGS=--xla_force_host_platform_device_count=N: fake CPU devices, XLA:CPU's buffer
  assignment (TPU/GPU compilers fuse and schedule differently: treat activations as an
  estimate; the parameter, optimizer and gradient figures are exact). The routed experts use
  the TPU/GPU default dispatch (`ragged_dot`; on XLA:CPU a masked contraction over the local
  experts, one per device at EP 256), and XLA:CPU's LLVM level 0 (code generation only; the
  HLO passes and buffer assignment that give the figures are unchanged). XLA:CPU has no
  `ragged_all_to_all`, so a preset with ep=ragged_a2a is compiled with the fixed-buffer
  all-to-all at capacity factor 2 (receive buffers of 2x the mean load) in its place.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

GiB = 1024 ** 3


def fit_points(dense: int, moe: int, remat: bool) -> list[tuple[int, int]]:
    """(dense, MoE) layer counts compiled to extrapolate from. With remat one compile: every
    further layer adds only its saved input (counted); without, a linear fit over three."""
    if remat:  # two of each: XLA unrolls a one-step scan, which would change the buffers
        return [(min(dense, 2), min(moe, 2))]
    if not dense:
        return [(0, 1), (0, 2)]
    if not moe:
        return [(1, 0), (2, 0)]
    return [(1, 1), (1, 2), (2, 1)]
CHILD_ENV = "JAXMOE_PLAN_CHILD"


def _leaf_bytes(tree) -> int:
    """Per-device bytes of a tree of ShapeDtypeStructs / arrays carrying NamedShardings."""
    import jax

    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape)
        total += math.prod(shard) * x.dtype.itemsize
    return total


def _abstract_state(mcfg, layout, tx, remat: bool):
    """(graphdef, abstract train state with shardings) of the trainer's state layout."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jaxmoe
    from jaxmoe.train.state import split_model

    graphdef, parts = split_model(nnx.eval_shape(
        lambda: jaxmoe.DeepseekV3(mcfg, rngs=nnx.Rngs(0), remat=remat)))

    def finish(p):
        return dict(p, opt=tx.init(p["params"]), rng=jax.random.PRNGKey(0),
                    step=jnp.zeros((), jnp.int32))

    state = jax.eval_shape(finish, parts)
    sh = layout.shardings(state)
    return graphdef, jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  state, sh)


def _compile_temp(mcfg, layout, tx, lr_fn, loss, remat, rows: int, seq: int,
                  compiler_options: dict | None = None) -> dict:
    """Compile one train step; its per-device memory_analysis figures (bytes)."""
    import jax
    import jax.numpy as jnp

    from jaxmoe.train.step import StepFns

    graphdef, state = _abstract_state(mcfg, layout, tx, remat)
    fns = StepFns(graphdef, mcfg, loss, tx, lr_fn, 1000)
    bsh = layout.batch_sharding(batch_dim=1)
    batch = {k: jax.ShapeDtypeStruct((1, rows, seq + 1), jnp.int32, sharding=bsh)
             for k in ("tokens", "segments", "positions")}
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    with layout.scope():
        step = jax.jit(fns.train_step, donate_argnums=(0,), compiler_options=compiler_options,
                       out_shardings=(state_sh, layout.replicated))
        m = step.lower(state, batch).compile().memory_analysis()
    return {"temp": m.temp_size_in_bytes, "argument": m.argument_size_in_bytes,
            "output": m.output_size_in_bytes, "alias": m.alias_size_in_bytes}


def plan(model: str = "deepseek_v3_671b", mesh: str = "cpu-8", seq: int = 4096,
         rows_per_shard: int = 1, param_dtype: str = "float32", dtype: str = "bfloat16",
         remat: bool = True, ep: str | None = None, moe_impl: str = "auto",
         fit: bool = True, overrides: dict | None = None,
         compiler_options: dict | None = None, moments_dtype: str = "float32") -> dict:
    """The memory plan (per-device bytes by category) as a dict; see the module docstring.
    `fit=False` compiles the full model directly instead of extrapolating; `overrides` edit the
    model preset (e.g. a scaled-down model); `compiler_options` go to XLA (tests: a faster
    CPU backend level, which leaves buffer assignment alone); `moments_dtype`: the AdamW moments'
    storage (`--optim.moments_dtype`)."""
    import jax
    import numpy as np

    import jaxmoe
    import pjit_configs
    from jaxmoe.train.config import LossSection, OptimSection
    from jaxmoe.train.optim import make_optimizer

    preset = pjit_configs.get(mesh)
    if ep:
        preset = preset.replace(ep=ep)
    devices = jax.devices()
    if len(devices) < preset.size:
        raise pjit_configs.PresetError(
            f"jaxmoe-plan: mesh preset {mesh!r} needs {preset.size} devices; {len(devices)} here "
            f"(run it through `jaxmoe-plan`, which adds fake CPU devices)")
    on_cpu = devices[0].platform == "cpu"
    ep_name = preset.ep
    if on_cpu and preset.ep == "ragged_a2a":
        # XLA:CPU has no ragged_all_to_all: compile the fixed-buffer all-to-all in its place
        preset = preset.replace(ep="a2a_fixed", capacity_factor=preset.capacity_factor or 2.0)
        ep_name = f"a2a_fixed x{preset.capacity_factor:g} (for ragged_a2a: not on XLA:CPU)"
    elif preset.ep == "a2a_fixed":
        ep_name = f"a2a_fixed x{preset.capacity_factor:g}" if preset.capacity_factor else \
            "a2a_fixed dropless"
    layout = preset.layout(devices[:preset.size])
    if moe_impl == "auto" and on_cpu and preset.device != "cpu":
        moe_impl = "ragged_dot"  # the TPU/GPU default dispatch, not XLA:CPU's segment loop
    if compiler_options is None and on_cpu:
        compiler_options = {"xla_backend_optimization_level": 0}  # LLVM only: same buffers
    full = jaxmoe.get_preset(model, param_dtype=param_dtype, dtype=dtype, moe_impl=moe_impl,
                             **(overrides or {}))
    tx, lr_fn = make_optimizer(OptimSection(moments_dtype=moments_dtype), 1000)
    loss = LossSection()
    rows = layout.batch_shards * rows_per_shard

    _, state = _abstract_state(full, layout, tx, remat)
    params = _leaf_bytes((state["params"], state["biases"]))
    grads = _leaf_bytes(state["params"])
    opt = _leaf_bytes(state["opt"])
    n_params = sum(x.size for x in jax.tree.leaves((state["params"], state["biases"])))

    d_full, m_full = full.num_dense_layers, full.num_hidden_layers - full.num_dense_layers
    compiled = []
    pts = fit_points(d_full, m_full, remat)
    if fit and (d_full, m_full) not in pts:
        for d, m in pts:
            small = full.replace(num_hidden_layers=d + m, first_k_dense_replace=d)
            c = _compile_temp(small, layout, tx, lr_fn, loss, remat, rows, seq, compiler_options)
            # activations at this depth: XLA's scratch less this depth's gradients
            c["activations"] = c["temp"] - _leaf_bytes(_abstract_state(small, layout, tx, remat)[1]
                                                       ["params"])
            compiled.append(((d, m), c))
        if remat:  # each further layer saves only its input h [rows/shards, T, D] for backward
            (d0, m0), c = compiled[0]
            per = rows_per_shard * seq * full.hidden_size * np.dtype(dtype).itemsize
            coef = [c["activations"] - per * (d0 + m0), per, per]
        else:
            y = np.array([c["activations"] for _, c in compiled], np.float64)
            cols = [0] + [1] * bool(d_full) + [2] * bool(m_full)
            A = np.array([[1.0, d, m] for (d, m), _ in compiled])[:, cols]
            coef = np.zeros(3)
            coef[cols] = np.linalg.lstsq(A, y, rcond=None)[0]
        coef = [float(x) for x in coef]
        activations = float(np.dot(coef, [1.0, d_full, m_full]))
        method = (f"compiled at (dense, MoE) layers {pts}; activations = {coef[0] / GiB:.3f} GiB"
                  f" + {coef[1] / GiB:.4f} x dense + {coef[2] / GiB:.4f} x MoE, evaluated at "
                  f"({d_full}, {m_full})")
    else:
        c = _compile_temp(full, layout, tx, lr_fn, loss, remat, rows, seq, compiler_options)
        c["activations"] = c["temp"] - grads
        compiled.append(((d_full, m_full), c))
        activations, coef = float(c["activations"]), None
        method = f"compiled at the full ({d_full}, {m_full}) layers"
    batch = 3 * _leaf_bytes([jax.ShapeDtypeStruct((1, rows, seq + 1), np.int32,
                                                  sharding=layout.batch_sharding(1))])
    total = params + opt + grads + activations + batch
    hbm = preset.hbm_gib * GiB
    return {
        "model": model, "mesh": preset.name, "mesh_shape": preset.describe(),
        "devices": preset.size, "device": preset.device, "hbm_bytes": hbm,
        "platform": devices[0].platform, "ep": ep_name, "n_params": n_params,
        "global_batch": rows, "seq": seq, "param_dtype": param_dtype, "dtype": dtype,
        "remat": remat, "moe_impl": moe_impl, "moments_dtype": moments_dtype,
        "bytes": {"parameters": params, "optimizer": opt, "gradients": grads,
                  "activations": activations, "batch": batch, "total": total},
        "temp_bytes": activations + grads, "fit_coef": coef,
        "compiled": [{"layers": list(p), **c} for p, c in compiled], "method": method,
        "fits": (total <= hbm) if hbm else None,
    }


def table(r: dict) -> str:
    b = r["bytes"]
    hbm = r["hbm_bytes"]
    lines = [
        f"jaxmoe-plan: {r['model']} ({r['n_params'] / 1e9:.1f}B params) on {r['mesh']} "
        f"({r['mesh_shape']}; {r['devices']} x {r['device']}"
        f"{f', {hbm / GiB:g} GiB each' if hbm else ''})",
        f"  step: batch {r['global_batch']} x {r['seq']} tokens, params {r['param_dtype']}, "
        f"AdamW moments {r['moments_dtype']}, "
        f"compute {r['dtype']}, remat {'on' if r['remat'] else 'off'}, ep {r['ep']}, "
        f"moe_impl {r['moe_impl']}; compiled on {r['platform']}",
        f"  activations: {r['method']}",
        "",
    ]
    unit, div = ("GiB", GiB) if b["total"] >= GiB / 4 else ("MiB", 1024 ** 2)
    lines.append(f"  per device           {unit:>8s}")
    for k, label in (("parameters", "parameters"), ("optimizer", "optimizer state"),
                     ("gradients", "gradients"), ("activations", "activations + temps"),
                     ("batch", "batch"), ("total", "total")):
        lines.append(f"  {label:20s} {b[k] / div:8.2f}")
    if hbm:
        verdict = "fits" if r["fits"] else "does NOT fit"
        lines.append(f"  HBM {hbm / GiB:g} GiB: {verdict} ({b['total'] / hbm:.0%} used)")
    return "\n".join(lines)


class _HelpFormat(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every valued flag's default."""

    def _get_help_string(self, action):
        if isinstance(action.const, bool):  # a switch: its "default" only restates the switch
            return action.help
        return super()._get_help_string(action)


def _parse(argv):
    from jaxmoe.train.config import MOMENT_DTYPES

    ap = argparse.ArgumentParser(prog="jaxmoe-plan", description=__doc__, formatter_class=_HelpFormat)
    ap.add_argument("--model", default="deepseek_v3_671b", help="jaxmoe model preset")
    ap.add_argument("--mesh", default="cpu-8", help="pjit_configs mesh preset")
    ap.add_argument("--seq", type=int, default=4096, help="tokens per row")
    ap.add_argument("--rows", type=int, default=1, help="rows per batch shard")
    ap.add_argument("--param-dtype", default="float32", help="parameter dtype")
    ap.add_argument("--moments-dtype", default="float32", choices=MOMENT_DTYPES,
                    help="AdamW moments' storage (the trainer's --optim.moments_dtype)")
    ap.add_argument("--dtype", default="bfloat16", help="matmul compute dtype")
    ap.add_argument("--no-remat", dest="remat", action="store_false",
                    help="keep every layer's activations instead of rematerialising them")
    ap.add_argument("--ep", default=None, help="override the preset's EP variant")
    ap.add_argument("--moe-impl", default="auto", help="routed-expert dispatch (ModelConfig.moe_impl)")
    ap.add_argument("--direct", action="store_true", help="compile the full model (no fit)")
    ap.add_argument("--json", default="", help="also write the result here")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = _parse(sys.argv[1:] if argv is None else argv)
    import pjit_configs

    try:
        need = pjit_configs.get(a.mesh).size
    except pjit_configs.PresetError as e:
        print(f"jaxmoe-plan: {e}", file=sys.stderr)
        return 2
    if not os.environ.get(CHILD_ENV):
        import jax

        if jax.device_count() < need:
            env = dict(os.environ, JAX_PLATFORMS="cpu", **{CHILD_ENV: "1"},
                       XLA_FLAGS=f"--xla_force_host_platform_device_count={need}")
            argv = sys.argv[1:] if argv is None else list(argv)
            return subprocess.call([sys.executable, "-m", "jaxmoe.plan", *argv], env=env)
    r = plan(a.model, a.mesh, a.seq, a.rows, a.param_dtype, a.dtype, a.remat, a.ep, a.moe_impl,
             fit=not a.direct, moments_dtype=a.moments_dtype)
    print(table(r))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
