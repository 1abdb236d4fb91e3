"""Shared plumbing of the Pallas kernels: which lowering to use, interpret mode, compiler params.

Every kernel has two lowerings: "gpu" (Pallas Triton) and "tpu" (Pallas Mosaic). `resolve` picks the one
for the default backend; on any other backend (the CPU) the GPU body runs in Pallas interpret mode, and
`platform="tpu", interpret=True` runs the TPU body under the TPU interpreter (DMAs and semaphores
simulated), which is how the CPU tests cover both.
"""

from __future__ import annotations

import jax
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

PLATFORMS = ("gpu", "tpu")


def resolve(platform: str | None, interpret: bool | None) -> tuple[str, bool]:
    """-> (platform, interpret). None picks the default backend's lowering (the GPU one on the CPU)
    and interprets whenever the default backend is not that platform."""
    backend = jax.default_backend()
    if platform is None:
        platform = "tpu" if backend == "tpu" else "gpu"
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")
    if interpret is None:
        interpret = backend != platform
    return platform, bool(interpret)


def call_kwargs(platform: str, interpret: bool, *, num_warps: int = 4, num_stages: int = 2,
                semantics: tuple[str, ...] | None = None) -> dict:
    """`interpret=` and `compiler_params=` keyword arguments of pl.pallas_call."""
    if interpret:
        return {"interpret": pltpu.InterpretParams() if platform == "tpu" else True}
    if platform == "gpu":
        return {"compiler_params": plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)}
    return {"compiler_params": pltpu.CompilerParams(dimension_semantics=semantics)}


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def round_up(n: int, m: int) -> int:
    return -(-int(n) // m) * m


def pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two that divides n, at most cap."""
    d = 1
    while n % (2 * d) == 0 and 2 * d <= cap:
        d *= 2
    return d
