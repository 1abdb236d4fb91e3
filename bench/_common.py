"""Shared by the bench scripts: the BENCHMARKS.md section writer, the CPU description, the quiet
environment set before jax is imported and the elapsed-time logger."""

from __future__ import annotations

import os
import platform
import time
import warnings


def write_section(path: str, text: str, begin: str, end: str) -> None:
    old = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    if begin in old and end in old:
        a, b = old.index(begin), old.index(end) + len(end)
        new = old[:a] + text + old[b:]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    with open(path, "w") as f:
        f.write(new)


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
