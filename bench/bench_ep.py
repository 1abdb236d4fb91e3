"""Expert-parallel communication: bytes per token per MoE layer of each EP variant at DeepSeek-V3 671B shapes.

    python bench/bench_ep.py --out BENCHMARKS.md     # appends/replaces the "## Expert parallelism" section

Counted: the bytes a device sends to other devices, per token it owns, in one MoE layer (the routed experts'
dispatch + combine; the router, shared expert and attention are not EP traffic). A collective over a group
of g devices with per-device result R bytes sends: all-to-all (g-1)/g R; all-gather (g-1)/g R;
reduce-scatter (g-1) R; all-reduce 2 (g-1)/g R; ragged-all-to-all the rows it sends (data-dependent: at
most its operand; (g-1)/g of them on uniform routing). Rows replicated over the expert group count once
(bytes of all g devices / the group's distinct tokens).

1. Analytic, DeepSeek-V3 671B (D = 7168 bf16, E = 256, top-8, 4096 tokens per device) for ep = 8 ... 64,
   for jaxmoe's variants and for MaxText's two EP paths (jax-peers.md 1.6: ring of experts all-gathers
   x, the gate logits and the pre-bias logits; ragged_all_to_all moves the x K pair rows).
2. Measured at ep = 8 on 8 fake CPU devices: the collectives of `jaxmoe.parallel.ep.experts_swiglu_ep`
   (forward, and forward + backward of a loss on its output) read from the HLO at those shapes (512
   tokens per device; bytes per token do not depend on it), each op's bytes from its shapes as above;
   the analytic model at the same point beside it. The variants that run on CPU are read from the
   XLA:CPU-compiled program (so partitioner-inserted collectives at the shard_map boundary count; the bf16
   widening pass of XLA:CPU is disabled and its promoted reductions are counted at bf16), "ragged_a2a" from
   the HLO lowered for TPU (before partitioning; the caller's rows already in the shard_map's layout).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import re
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AbstractMesh, AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
from jaxmoe.parallel import ep, ep_a2a  # noqa: E402
from jaxmoe.parallel.context import EPSpec  # noqa: E402

MARK_BEGIN, MARK_END = "<!-- bench_ep:begin -->", "<!-- bench_ep:end -->"
D, E, K, F, B = 7168, 256, 8, 2048, 2  # DeepSeek-V3 671B; B = bytes of a bf16 activation
ROW = D * B
DTYPE_BYTES = {"bf16": 2, "f32": 4, "s32": 4, "pred": 1, "f16": 2, "u32": 4, "s8": 1}
EPS = (8, 16, 32, 64)


# ------------------------------------------------------------------------------------------ analytic
def analytic(name: str, ep_size: int, m: int) -> float:
    """Forward bytes sent per token per layer (see the module docstring). Routing metadata: jaxmoe sends
    int32 expert ids (+ float32 weights in the ring); MaxText's ring gathers two [E] bf16 logit rows."""
    g, El = ep_size, E // ep_size
    if name == "allgather":  # x + top-k (ids, weights) gathered, y reduce-scattered
        return (g - 1) * (ROW + 8 * K) + (g - 1) * ROW
    if name == "allgather_replicated":  # rows already on every device: y reduce-scattered, then all-gathered
        return 2 * (g - 1) * ROW
    if name.startswith("a2a_fixed"):
        cf = None if name.endswith("dropless") else float(name.rsplit("_", 1)[1])
        C = ep_a2a.peer_capacity(m, K, El, g, cf)
        rows = (g - 1) * C / m  # full [C, D] buffers to g-1 peers, per token
        extra = (g - 1) * ROW if "replicated" in name else 0  # all-gather of y back over the group
        return rows * (ROW + 4) + rows * ROW + extra
    if name == "ragged_a2a":  # uniform routing: (g-1)/g of the K rows leave the device
        return K * (g - 1) / g * (ROW + 4) + K * (g - 1) / g * ROW + 4 * 4 * (g - 1) / m
    if name == "ragged_a2a_worst":
        return K * (ROW + 4) + K * ROW + 4 * 4 * (g - 1) / m
    if name == "maxtext_ring":
        return (g - 1) * (ROW + 2 * E * B) + (g - 1) * ROW
    if name == "maxtext_ragged":  # pair rows both ways (+ an all-gather of [E] int32 group sizes)
        return 2 * K * (g - 1) / g * ROW + (g - 1) * E * 4 / m
    raise KeyError(name)


ANALYTIC_ROWS = [
    ("jaxmoe `allgather` (ring of experts), rows split over the expert axis", "allgather"),
    ("jaxmoe `allgather`, rows replicated over the expert axis", "allgather_replicated"),
    ("jaxmoe `ragged_a2a`, uniform routing", "ragged_a2a"),
    ("jaxmoe `ragged_a2a`, worst case (every pair off-device)", "ragged_a2a_worst"),
    ("jaxmoe `a2a_fixed`, capacity factor 1.25", "a2a_fixed_1.25"),
    ("jaxmoe `a2a_fixed`, capacity factor 2", "a2a_fixed_2"),
    ("jaxmoe `a2a_fixed`, dropless (worst-case buffers)", "a2a_fixed_dropless"),
    ("MaxText ring of experts (x + logits + pre-bias logits, bf16)", "maxtext_ring"),
    ("MaxText `ragged_all_to_all`, uniform routing", "maxtext_ragged"),
]


# ------------------------------------------------------------------------------------------ measured
def _shapes(text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in
            re.findall(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]", text)]


def _nbytes(shapes) -> int:
    return sum(DTYPE_BYTES[dt] * math.prod(s) for dt, s in shapes)


OPS = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute", "ragged-all-to-all")


def group_size(line: str) -> int:
    """Devices per replica group: {{0,1,..},..}, iota [n,g]<=[..], or mesh['a'=8,'b'=1] {'a'}."""
    if mm := re.search(r"replica_groups=\{\{([0-9,]*)\}", line):
        return len(mm.group(1).split(","))
    if mm := re.search(r"replica_groups=\[(\d+),(\d+)\]", line):
        return int(mm.group(2))
    if mm := re.search(r"replica_groups=mesh\[(.*?)\] \{(.*?)\}", line):
        sizes = {a: int(n) for a, n in re.findall(r"'(\w+)'=(\d+)", mm.group(1))}
        return math.prod(sizes[a] for a in re.findall(r"'(\w+)'", mm.group(2)))
    raise ValueError(f"replica groups not understood: {line[:200]}")


def collectives(hlo: str) -> list[dict]:
    """Every collective of an HLO module: op, group size, result shapes, sent bytes per device."""
    types = {}
    out = []
    for line in hlo.splitlines():
        mm = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([a-z\-]+)\((.*?)\)", line)
        if not mm:
            continue
        name, rtype, op, operands = mm.groups()
        types[name] = rtype
        base = op.removesuffix("-start")
        if base not in OPS or op.endswith("-done"):
            continue
        res = _shapes(rtype)
        if re.search(r"to_apply=%?[\w.]*_promoted", line):  # widened from bf16 by all-reduce-promotion
            res = [("bf16", shape) for _, shape in res]
        R = _nbytes(res)
        g = group_size(line)
        if base == "ragged-all-to-all":  # at most min(operand rows, output rows) rows move
            first = operands.split(",")[0].strip()
            rows_in = _shapes(types.get(first, rtype))[0][1][0]
            sent = R * min(rows_in, res[0][1][0]) / res[0][1][0]
        else:
            sent = {"all-to-all": R * (g - 1) / g, "all-gather": R * (g - 1) / g, "reduce-scatter": R * (g - 1),
                    "all-reduce": 2 * R * (g - 1) / g, "collective-permute": R}[base]
        out.append(dict(op=base, g=g, shapes=res, elements=sum(math.prod(s) for _, s in res), sent=sent))
    return out


MEASURED = [  # (label, variant, capacity factor, rows split over the expert axis, analytic key)
    ("`allgather`, rows split", "allgather", None, True, "allgather"),
    ("`allgather`, rows replicated", "allgather", None, False, "allgather_replicated"),
    ("`ragged_a2a` (upper bound: all pairs off-device; lowered for TPU)", "ragged_a2a", None, True,
     "ragged_a2a_worst"),
    ("`a2a_fixed`, capacity factor 1.25", "a2a_fixed", 1.25, True, "a2a_fixed_1.25"),
    ("`a2a_fixed`, capacity factor 1.25, rows replicated", "a2a_fixed", 1.25, False,
     "a2a_fixed_replicated_1.25"),
    ("`a2a_fixed`, dropless", "a2a_fixed", None, True, "a2a_fixed_dropless"),
]


def _program(variant, cf, split, mesh, m, impl):
    """(fwd, fwd+bwd) jitted at DeepSeek shapes; the caller's rows arrive and leave split over the expert
    axis (split) or replicated over it, so partitioner-inserted collectives at the boundary count too."""
    spec = EPSpec(mesh, "expert", ("expert",) if split else (), variant, capacity_factor=cf)
    M = m * 8 if split else m  # rows per device: m either way (replicated rows: each device holds all)
    rows = NamedSharding(mesh, P("expert" if split else None))
    experts = NamedSharding(mesh, P("expert"))

    def fwd(x, w, e, wg, wu, wd):
        return ep.experts_swiglu_ep(x, w, e, wg, wu, wd, spec=spec, impl=impl)[0]

    def loss(x, w, e, wg, wu, wd):  # y in the caller's layout first, as a residual add would need it
        y = jax.lax.with_sharding_constraint(fwd(x, w, e, wg, wu, wd), rows)
        return jnp.sum(jnp.square(y.astype(jnp.float32)))

    S = jax.ShapeDtypeStruct
    args = (S((M, D), jnp.bfloat16), S((M, K), jnp.float32), S((M, K), jnp.int32), S((E, D, F), jnp.bfloat16),
            S((E, D, F), jnp.bfloat16), S((E, F, D), jnp.bfloat16))
    shard = (rows, rows, rows, experts, experts, experts)
    grads = (rows, rows, experts, experts, experts)
    return {"fwd": (jax.jit(fwd, in_shardings=shard, out_shardings=rows), args),
            "fwd+bwd": (jax.jit(jax.grad(loss, argnums=(0, 1, 3, 4, 5)), in_shardings=shard,
                                out_shardings=grads), args)}


# XLA:CPU widens bf16 collectives to f32 in this pass; off, the compiled program keeps the model's dtypes
# (these programs are compiled, never run). Its reductions (reduce-scatter, all-reduce) must stay widened
# ("all-reduce-promotion": XLA:CPU has no bf16 reduce-scatter); `collectives` counts those at bf16.
KEEP_BF16 = {"xla_disable_hlo_passes": "float-normalization-bf16"}


def measure(m: int, log) -> list[dict]:
    amesh = AbstractMesh((8,), ("expert",), axis_types=(AxisType.Auto,))
    cmesh = jax.make_mesh((8,), ("expert",), axis_types=(AxisType.Auto,))
    rows = []
    for label, variant, cf, split, key in MEASURED:
        r = dict(label=label, variant=variant, analytic=analytic(key, 8, m))
        distinct = m if split else m / 8  # distinct tokens per device
        for phase in ("fwd", "fwd+bwd"):
            if variant == "ragged_a2a":  # no XLA:CPU lowering: the HLO lowered for TPU (before partitioning)
                with jax.sharding.use_abstract_mesh(amesh):
                    fn, args = _program(variant, cf, split, amesh, m, "ragged_dot")[phase]
                    hlo = fn.trace(*args).lower(lowering_platforms=("tpu",)).as_text("hlo")
            else:  # the XLA:CPU-compiled program: shard_map collectives + what the partitioner inserted
                fn, args = _program(variant, cf, split, cmesh, m, "segment")[phase]
                hlo = fn.lower(*args).compile(compiler_options=KEEP_BF16).as_text()
            cols = collectives(hlo)
            r[phase] = sum(c["sent"] for c in cols) / distinct
            r[phase + "_ops"] = cols
        log(f"  {label}: fwd {r['fwd'] / 1024:.1f} KiB/token (analytic {r['analytic'] / 1024:.1f}), "
            f"fwd+bwd {r['fwd+bwd'] / 1024:.1f}; {_ops_summary(r['fwd+bwd_ops'])}")
        rows.append(r)
    return rows


def _ops_summary(cols) -> str:
    names = {"all-to-all": "a2a", "all-gather": "AG", "reduce-scatter": "RS", "all-reduce": "AR",
             "ragged-all-to-all": "ragged a2a", "collective-permute": "permute"}
    count = {}
    for c in cols:
        count[names[c["op"]]] = count.get(names[c["op"]], 0) + 1
    return ", ".join(f"{n} {k}" for k, n in count.items())


def render(m_analytic: int, m_measured: int, measured: list[dict]) -> str:
    kib = lambda b: f"{b / 1024:.0f}"  # noqa: E731
    L = [MARK_BEGIN, "## Expert parallelism\n",
         f"`python bench/bench_ep.py --out BENCHMARKS.md` ({datetime.date.today()}, jax {jax.__version__}). "
         "Bytes a device sends to other devices per token it owns, per MoE layer (routed experts' dispatch + "
         f"combine), DeepSeek-V3 671B shapes: D = {D} bf16 (one token row = {ROW // 1024} KiB), E = {E}, "
         f"top-{K}. Formulas and the HLO accounting: the script's docstring.\n",
         f"**Analytic, forward, KiB per token per layer** ({m_analytic} tokens per device; the backward sends "
         "the same volumes again through the transposed collectives, see the measured table)\n",
         "| variant | " + " | ".join(f"ep={g}" for g in EPS) + " | ep=8 in token rows |",
         "|---|" + "---|" * (len(EPS) + 1)]
    for label, key in ANALYTIC_ROWS:
        vals = [analytic(key, g, m_analytic) for g in EPS]
        L.append(f"| {label} | " + " | ".join(kib(v) for v in vals) + f" | {vals[0] / ROW:.1f} |")
    L += ["", f"**Measured from the compiled HLO, ep = 8** (8 fake CPU devices, {m_measured} tokens per device; "
          "KiB per token per layer; the forward alone, and forward + backward of a loss on the layer output "
          "taken in the caller's layout). The all-to-all and ring programs are XLA:CPU-compiled, so the "
          "collectives the partitioner adds at the shard_map boundary count too; `ragged_a2a` cannot compile "
          "on CPU and is read from the HLO lowered for TPU, at its upper bound (every row sent).\n",
          "| variant | collectives in fwd+bwd | fwd | analytic fwd | fwd+bwd |",
          "|---|---|---|---|---|"]
    for r in measured:
        L.append(f"| {r['label']} | {_ops_summary(r['fwd+bwd_ops'])} | {kib(r['fwd'])} | {kib(r['analytic'])} "
                 f"| {kib(r['fwd+bwd'])} |")
    El = E // 8
    L += ["",
          "Reading it:",
          "",
          f"- One token row is {ROW // 1024} KiB. Ring of experts sends it to the other ep-1 devices and sums it "
          f"back, 2 (ep-1) rows; the all-to-alls send the K = {K} pair rows out and back, 2 K (ep-1)/ep. At "
          "ep = 8 with top-8 the two are equal (196 KiB); past ep = K the ring grows linearly with ep while "
          "the all-to-all stays under 2 K rows (MaxText's docs make the same point: the ring communicates "
          "before the x K replication, so it wins for large top-k at small ep).",
          "- Against MaxText (jax-peers.md 1.6): its ring all-gathers the gate logits and pre-bias logits "
          f"([E] each, bf16: {2 * E * B} B per token per peer, "
          f"{100 * (analytic('maxtext_ring', 8, m_analytic) / analytic('allgather', 8, m_analytic) - 1):.1f}% "
          "more bytes than jaxmoe's ring) where "
          "jaxmoe all-gathers the top-k ids and weights (64 B); its `ragged_all_to_all` moves the same pair "
          "rows as jaxmoe's (jaxmoe adds a 4 B int32 expert id per row; MaxText instead all-gathers the "
          "[ep, E] group sizes).",
          "- `a2a_fixed` sends whole buffers, zeros included: capacity factor c costs ~c x the all-to-all "
          "volume; dropless buffers (any local pair may target one device: min(K, E/ep) = "
          f"{min(K, El)} rows per token per peer at ep = 8) cost (ep-1) min(K, E/ep) rows, 8x at ep = 8. "
          "Over capacity, pairs are dropped and counted (aux[\"dropped\"]). The receive buffer of "
          "`ragged_a2a` (memory, not traffic) is sized as MaxText's `get_ragged_buffer_size`: dropless "
          "balanced x min(ep, E/K) (<= 32x for DeepSeek), or capacity_factor x balanced (MaxText's "
          "`ragged_buffer_factor`, suggested ~3.0); both keep lower source devices' rows first.",
          "- Rows split over the expert axis (batch sharded over it, MaxText's `activation_batch` rule): the "
          "backward costs what the forward does (all-gather <-> reduce-scatter, all-to-alls reversed; the "
          "ring also reduce-scatters d(routing weights), 4 K B per peer). Rows replicated over the expert "
          "axis (attention not sharded over it): the partitioner slices the rows into the shard_map for "
          "free, but must all-gather y after it and d x in the backward, (ep-1) rows each: +98 KiB "
          "forward for the all-to-alls (the ring's forward stays 2 (ep-1) rows: it needs no gather), and "
          "the ring's backward all-reduces d x. Shard the batch over the expert axis for EP.",
          "- Not measured: time. These are volumes; the CPU mesh says nothing about what ICI or NVLink do "
          "with them (jax-peers.md: on GPU `ragged_all_to_all` has been far slower than the ring, Marin "
          "#7012; DeepEP-style per-device token dedup, which jaxmoe does not do, would cut the all-to-all "
          "rows of a token to its distinct destination devices).",
          MARK_END]
    return "\n".join(L)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per device for the analytic table")
    ap.add_argument("--measure-tokens", type=int, default=512, help="tokens per device for the HLO measurement")
    ap.add_argument("--out", default=None, help="BENCHMARKS.md to update")
    args = ap.parse_args()
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    measured = measure(args.measure_tokens, log)
    text = render(args.tokens, args.measure_tokens, measured)
    print(text)
    if args.out:
        _common.write_section(args.out, text, MARK_BEGIN, MARK_END)


if __name__ == "__main__":
    main()
