"""bench_model.py's record of where it ran: CPU, memory, load, library versions, git revision."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess

from _common import cpu_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    fl = set(line.split(":", 1)[1].split())
                    return " ".join(x for x in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")
                                    if x in fl)
    except OSError:
        pass
    return "?"


def versions() -> dict:
    import flax
    import jax
    import jaxlib
    import numpy as np
    import optax
    import torch
    import transformers
    return {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "flax": flax.__version__, "optax": optax.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__}


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--", "jaxmoe"],
                               capture_output=True, text=True).stdout.strip()
        return rev + (" + uncommitted jaxmoe/ changes" if dirty else "")
    except Exception:
        return "?"


def file_sha(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:12]
    except OSError:
        return "?"


def load_avg() -> str:
    """The 1/5/15-minute load averages, e.g. "0.4 1.3 1.5"."""
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def environment() -> dict:
    """The machine and software at the start of a run (the report adds "load_end")."""
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30)
    except (ValueError, OSError):
        mem_gb = "?"
    return {"nproc": os.cpu_count(), "cpu": cpu_model(), "flags": cpu_flags(), "versions": versions(),
            "git": git_rev(), "dispatch_sha": file_sha(os.path.join(REPO, "jaxmoe", "kernels", "dispatch.py")),
            "load_start": load_avg(), "mem_gb": mem_gb, "omp": os.environ.get("OMP_WAIT_POLICY", "(unset)")}
