"""Shared by the bench scripts: the timed case and its interleaved rounds, the BENCHMARKS.md
section writer, the CPU description, the quiet environment set before jax is imported and the
elapsed-time logger."""

from __future__ import annotations

import gc
import os
import platform
import re
import statistics
import time
import warnings


# ----------------------------------------------------------------------------------- timing
class Case:
    """One timed thing: `fn()` runs it once and blocks until the result is ready.

    tokens, flops: per run, for rates. repeats: the rounds this case takes part in (None: all).
    back_to_back: runs in a row per round, the last one timed (a training run's steps follow each
    other; the first step after other work pays for re-faulting its buffers). timed: `fn` measures
    itself and returns its seconds (then it runs once per round whatever back_to_back says)."""

    def __init__(self, key: str, fn, tokens: int = 0, flops: float = 0.0, repeats: int | None = None,
                 back_to_back: int = 1, timed: bool = False):
        self.key, self.fn, self.tokens, self.flops, self.repeats = key, fn, tokens, flops, repeats
        self.back_to_back, self.timed = back_to_back, timed
        self.warm_s: float | None = None  # compile (jax) or first call (torch)
        self.times: list[float] = []  # wall seconds
        self.cpu: list[float] = []    # process CPU seconds (all threads), same runs
        self.meta: dict = {}

    @property
    def med(self) -> float:
        return statistics.median(self.times)

    @property
    def cpu_med(self) -> float:
        return statistics.median(self.cpu)

    @property
    def best(self) -> float:
        return min(self.times)

    def run(self) -> None:
        """One round's runs: `back_to_back - 1` untimed, then one timed (wall and process CPU)."""
        for _ in range(0 if self.timed else self.back_to_back - 1):
            self.fn()
        c0, t0 = time.process_time(), time.perf_counter()
        took = self.fn()
        wall = time.perf_counter() - t0
        self.times.append(took if self.timed else wall)
        self.cpu.append(time.process_time() - c0)


def run_rounds(cases: list, repeats: int, log) -> None:
    """`repeats` rounds; each round runs each case in order (interleaved: every case sees the same
    load), skipping a case once its own `repeats` are done; garbage collected before each case."""
    for r in range(repeats):
        done = []
        for c in cases:
            if c.repeats is not None and r >= c.repeats:
                continue
            gc.collect()
            c.run()
            done.append(c)
        log(f"  round {r + 1}/{repeats}: " + ", ".join(f"{c.key}={c.times[-1]:.3f}" for c in done))


def paired(ref: Case, c: Case) -> tuple[float, float]:
    """Speed of c relative to ref: the median over rounds of ref_time / c_time, pairing the runs of
    the same round (both ran under the same load); wall and CPU. c's rounds are a prefix of ref's."""
    n = min(len(ref.times), len(c.times))
    w = statistics.median(ref.times[i] / c.times[i] for i in range(n))
    u = statistics.median(ref.cpu[i] / c.cpu[i] for i in range(n))
    return w, u


def timed(fn):
    """(fn(), its wall seconds)."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def jit_case(key: str, f, args: tuple, **kw) -> Case:
    """A Case running jax.jit(f)(*args), compiled ahead of time (warm_s = compile seconds; the
    executable in meta["compiled"]) and run once, so the first timed run is a steady one."""
    import jax
    comp, t_c = timed(lambda: jax.jit(f).lower(*args).compile())
    c = Case(key, lambda: jax.block_until_ready(comp(*args)), **kw)
    c.warm_s = t_c
    c.meta["compiled"] = comp
    c.fn()
    return c


# ------------------------------------------------------------------------------ BENCHMARKS.md
def write_section(path: str, text: str, begin: str, end: str | None = None) -> None:
    """(Re)write one section of the markdown file `path`: from the line `begin` to the line `end`
    (both included), or with end=None from the heading `begin` up to the next "## " heading or
    "<!-- " marker line (the next section's begin marker stays); appended when the file has no such
    section (a missing file starts as "# Benchmarks")."""
    old = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    new = None
    if end is None:
        m = re.search(rf"^{re.escape(begin)}\n.*?(?=^## |^<!-- |\Z)", old, flags=re.S | re.M)
        if m:  # keep one blank line before the next section
            new = old[:m.start()] + text + ("\n" if old[m.end():] else "") + old[m.end():]
    elif begin in old and end in old:
        a, b = old.index(begin), old.index(end) + len(end)
        new = old[:a] + text + old[b:]
    if new is None:
        new = (old.rstrip("\n") + "\n\n" if old.strip() else "") + text.rstrip("\n") + "\n"
    with open(path, "w") as f:
        f.write(new)


# -------------------------------------------------------------------------------- environment
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _configs_path() -> str:
    """bench_configs.json: the shared copy beside the repository if present, else the repository's."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shared = os.path.join(repo, "..", "shared", "bench", "bench_configs.json")
    return shared if os.path.isfile(shared) else os.path.join(repo, "bench", "bench_configs.json")


CONFIGS = _configs_path()


def quiet_env(cpu: bool = True) -> None:
    """Before jax is imported: no XLA info logs, no warnings; with cpu, JAX on the CPU."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if cpu:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    warnings.filterwarnings("ignore")


def elapsed_logger():
    """log(msg): prints msg after the seconds since this call, flushed."""
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", flush=True)

    return log
