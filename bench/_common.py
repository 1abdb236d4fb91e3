"""Shared by the bench scripts: the BENCHMARKS.md section writer and the CPU description."""

from __future__ import annotations

import os
import platform


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
