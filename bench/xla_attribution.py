"""XLA:CPU thunk time of a compiled jaxmoe step, attributed to jaxmoe source components: run it
under jax.profiler, read the thunks' HLO op names from the trace and map each op to the innermost
jaxmoe stack frame recorded in the HLO text."""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import shutil
import tempfile
import time

# (path suffix under jaxmoe/, component name); a file not listed is its own component
COMPONENTS = (("kernels/dispatch.py", "routed experts (dispatch.py)"), ("layers/mla.py", "MLA attention (mla.py)"),
              ("layers/stack.py", "layer scan carry/stacking (stack.py)"),
              ("layers/mlp.py", "dense + shared SwiGLU (mlp.py)"), ("model.py", "embedding + LM head (model.py)"),
              ("layers/norm.py", "RMSNorm"), ("layers/rope.py", "rope"), ("layers/router.py", "router"),
              ("layers/moe.py", "MoE glue + routing stats (moe.py)"), ("layers/block.py", "residuals (block.py)"))
LOSS_FILE = "model_cases.py"  # where bench_model's training step defines its loss_fn


def _hlo_sources(txt: str) -> dict:
    """HLO instruction name -> (opcode, innermost-first list of (file, function, line))."""
    files, funcs, locs, frames = {}, {}, {}, {}
    sec = None
    for line in txt.splitlines():
        s = line.strip()
        if s in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            sec = s
            continue
        if sec and (not s or s.startswith(("%", "ENTRY", "HloModule", "ROOT"))):
            sec = None
        if sec == "FileNames" or sec == "FunctionNames":
            i, n = s.split(" ", 1)
            (files if sec == "FileNames" else funcs)[int(i)] = n.strip('"')
        elif sec == "FileLocations":
            m = re.match(r"(\d+) \{file_name_id=(\d+) function_name_id=(\d+) line=(\d+)", s)
            if m:
                locs[int(m[1])] = (files.get(int(m[2]), "?"), funcs.get(int(m[3]), "?"), int(m[4]))
        elif sec == "StackFrames":
            m = re.match(r"(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)", s)
            if m:
                frames[int(m[1])] = (int(m[2]), int(m[3]))
    out = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$", txt, re.M):
        name, rest = m[1], m[2]
        op = re.search(r"\s([a-z][\w\-]*)\(", " " + rest)
        sf = re.search(r"stack_frame_id=(\d+)", rest)
        chain, f, seen = [], int(sf[1]) if sf else 0, set()
        while f and f in frames and f not in seen:
            seen.add(f)
            chain.append(locs.get(frames[f][0]))
            f = frames[f][1]
        out[name] = (op[1] if op else "?", chain)
    return out


def _component(chain) -> tuple[str, str]:
    """(component, "file:function") of an innermost-first stack: the first jaxmoe frame, else the
    optimizer, else the benchmark's loss, else "other"."""
    for c in chain:
        if c and "/jaxmoe/" in c[0]:
            rel = c[0].split("/jaxmoe/")[-1]
            fn = c[1].split(".<locals>")[0]
            comp = next((n for p, n in COMPONENTS if rel.endswith(p)), rel)
            return comp, f"{rel}:{fn}"
    for c in chain:
        if c and "/optax/" in c[0]:
            return "optimizer (optax)", "optax"
    for c in chain:
        if c and LOSS_FILE in c[0]:
            return "loss (cross-entropy)", f"{LOSS_FILE}:loss_fn"
    return "other", "other"


def attribute(compiled, run, n: int, log) -> dict | None:
    """Run `run()` n times under jax.profiler and add up the XLA:CPU thunk time per jaxmoe
    source component (innermost jaxmoe stack frame of each HLO instruction). Control-flow thunks
    (while/conditional) are skipped: their bodies' thunks are counted. Thunk time is summed over
    the threads that ran them, so it can exceed wall time; async thunks are undercounted."""
    import jax
    try:
        src = _hlo_sources(compiled.as_text())
        logdir = tempfile.mkdtemp(prefix="bench_trace_")
        with jax.profiler.trace(logdir, create_perfetto_trace=True):
            t0 = time.perf_counter()
            for _ in range(n):
                run()
            wall = (time.perf_counter() - t0) / n
        path = sorted(glob.glob(os.path.join(logdir, "plugins", "profile", "*", "perfetto_trace.json.gz")))[-1]
        with gzip.open(path) as f:
            ev = json.load(f)
        shutil.rmtree(logdir, ignore_errors=True)
        ev = ev["traceEvents"] if isinstance(ev, dict) else ev
        comp_t, fn_t, kind_t = collections.Counter(), collections.Counter(), collections.Counter()
        nthunks = 0
        for e in ev:
            if e.get("ph") != "X" or "hlo_op" not in e.get("args", {}):
                continue
            name = e["args"]["hlo_op"]
            opcode, chain = src.get(name, ("?", []))
            if opcode in ("while", "conditional", "call") or re.match(r"(while|cond|conditional|call)(\.\d+)?$", name):
                continue
            comp, fn = _component(chain)
            dur = e["dur"] / 1e3 / n  # ms per step
            comp_t[comp] += dur
            fn_t[fn] += dur
            is_mm = name.startswith(("ynn_fusion", "xnn_fusion", "dot", "onednn")) or opcode in ("dot", "custom-call")
            kind_t["matmul" if is_mm else "other (elementwise, copies, gathers, ...)"] += dur
            nthunks += 1
        return {"wall_ms": wall * 1e3, "components": comp_t.most_common(), "functions": fn_t.most_common(12),
                "kinds": kind_t.most_common(), "thunks_per_step": nthunks / n}
    except Exception as e:
        log(f"  trace attribution failed: {e!r}")
        return None
