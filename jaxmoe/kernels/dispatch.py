"""Dropless expert dispatch: permute (token, expert) pairs by expert, run each expert's SwiGLU on
its contiguous rows, combine back with the routing weights.

Implementations (all give the same results), chosen by `ModelConfig.moe_impl`:
- "segment": the fast CPU path (`jaxmoe.kernels.segment`): a loop of one GEMM triple per expert on rows
  gathered straight from x, chunk sizes bucketed to cut padding, a custom VJP. Costs the routed FLOPs
  plus < one bucket step of rows per expert.
- "pallas": the Pallas kernels (`jaxmoe.kernels`): permute (row gather), grouped matmul (Triton on GPU,
  megablox on TPU), weighted combine; each with its own custom VJP. Interpret mode on the CPU.
- "ragged_dot": `jax.lax.ragged_dot` on the sorted rows. Native grouped matmul on TPU, but on XLA:CPU a
  dense masked contraction costing E x the routed FLOPs (and reported dense on GPU).
- "dense": every expert on every token, masked. E x the FLOPs; the plain reference for tests.
Defaults ("auto"): segment on CPU, pallas on GPU, ragged_dot on TPU.

Capacity mode (`ModelConfig.moe_capacity_factor`): `capacity_keep` keeps, per expert, the first
ceil(factor * M*K / E) pairs in token order and drops the rest (their weight is zeroed and the segment
and pallas paths skip their rows); the count of dropped pairs goes into the MoE aux dict.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.kernels import common, segment
from jaxmoe.kernels.gmm import ops as gmm_ops
from jaxmoe.kernels.permute import ops as permute_ops

IMPLS = ("segment", "ragged_dot", "dense", "pallas")
# GPU stays on ragged_dot until bench/gpu_check.sh has run the Pallas kernels on hardware (they
# lower for CUDA in tests, but have not been compiled on a device yet).
DEFAULT_IMPL = {"cpu": "segment", "gpu": "ragged_dot", "tpu": "ragged_dot"}


def default_impl() -> str:
    return DEFAULT_IMPL.get(jax.default_backend(), "ragged_dot")


def capacity_keep(experts: jax.Array, num_experts: int, capacity_factor: float
                  ) -> tuple[jax.Array, jax.Array]:
    """(keep [M, K] bool, dropped pairs int32): each expert keeps its first ceil(factor * M*K / E) pairs,
    earlier tokens first (then lower k)."""
    M, K = experts.shape
    cap = int(np.ceil(capacity_factor * M * K / num_experts))
    flat = experts.reshape(-1)  # [M, K] -> [M*K]
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=num_experts)
    rank_sorted = jnp.arange(M * K) - (jnp.cumsum(sizes) - sizes)[flat[order]]
    keep = jnp.zeros((M * K,), bool).at[order].set(rank_sorted < cap).reshape(M, K)  # [M*K] -> [M, K]
    return keep, (M * K - keep.sum()).astype(jnp.int32)


def _swiglu(gu: jax.Array) -> jax.Array:
    g, u = jnp.split(gu, 2, axis=-1)
    return jax.nn.silu(g) * u


def combine(y_pairs: jax.Array, weights: jax.Array, out_dtype) -> jax.Array:
    """y_pairs [M, K, D] weighted by [M, K] (float32 accumulation) -> [M, D]."""
    return jnp.einsum("MKD,MK->MD", y_pairs.astype(jnp.float32), weights).astype(out_dtype)


def experts_swiglu(x: jax.Array, weights: jax.Array, experts: jax.Array, w_gate: jax.Array,
                   w_up: jax.Array, w_down: jax.Array, impl: str, tile: int | None = None,
                   keep: jax.Array | None = None) -> jax.Array:
    """Routed experts. x [M, D], weights/experts [M, K], w_gate/w_up [E, D, F], w_down [E, F, D].

    tile: "segment": the largest row chunk (default from the mean rows per expert); "pallas": the row
    tile of the grouped matmul. keep [M, K] bool: pairs to compute (capacity mode); None = all.
    """
    M, K = experts.shape
    E = w_gate.shape[0]
    if impl not in IMPLS:
        raise ValueError(f"unknown moe_impl {impl!r}; expected one of {IMPLS}")
    if impl == "segment":
        return segment.experts_swiglu(x, weights, experts, w_gate, w_up, w_down, cap=tile, keep=keep)
    if impl == "pallas":
        return _pallas_experts(x, weights, experts, w_gate, w_up, w_down, tile, keep)
    if keep is not None:
        weights = jnp.where(keep, weights, 0)
    if impl == "dense":
        # gate|up packed (Z = 2F) in one einsum: at 1-2k tokens its CPU gradient beat two MD,EDF->MEF ones ~1.3x
        w_gu = jnp.concatenate([w_gate, w_up], axis=-1)  # [E, D, Z]
        h = _swiglu(jnp.einsum("MD,EDZ->MEZ", x, w_gu))  # [M, E, F]
        y = jnp.einsum("MEF,EFD->MED", h, w_down)  # [M, E, D]
        return combine(jnp.take_along_axis(y, experts[:, :, None], axis=1), weights, x.dtype)
    w_gu = jnp.concatenate([w_gate, w_up], axis=-1)  # [E, D, Z]
    flat = experts.reshape(-1)  # [M, K] -> [M*K]
    if keep is not None:  # dropped pairs sort after the last group: ragged_dot skips (zeroes) them
        flat = jnp.where(keep.reshape(-1), flat, E)  # keep [M, K] -> [M*K]
    order = jnp.argsort(flat, stable=True)
    xs = x[order // K]  # [M*K, D] expert-sorted rows
    sizes = jnp.bincount(flat, length=E).astype(jnp.int32)  # the dropped bucket E is not counted
    h = _swiglu(jax.lax.ragged_dot(xs, w_gu, sizes))
    ys = jax.lax.ragged_dot(h, w_down, sizes)  # [M*K, D]
    y = jnp.zeros_like(ys).at[order].set(ys)  # back to pair order
    return combine(y.reshape(M, K, -1), weights, x.dtype)  # [M*K, D] -> [M, K, D]


def _pallas_experts(x, weights, experts, w_gate, w_up, w_down, tile, keep, *, platform=None, interpret=None):
    """permute (Pallas row gather) -> 3 grouped matmuls -> weighted combine (Pallas), each with a VJP.
    platform/interpret: see `common.resolve` (default: the backend's lowering; interpret on the CPU)."""
    M, K = experts.shape
    E = w_gate.shape[0]
    platform, interpret = common.resolve(platform, interpret)
    block = gmm_ops.BlockSizes.get_default(platform)
    block = dataclasses.replace(block, bm=tile or pallas_row_tile(M * K, E, platform, interpret))
    plan = permute_ops.make_plan(experts, E, align=block.bm if platform == "gpu" else 1, row_multiple=block.bm,
                                 keep=keep)
    kw = dict(platform=platform, interpret=interpret)
    xs = permute_ops.permute(x, plan, **kw)  # [R, D]
    g = gmm_ops.gmm(xs, w_gate, plan.group_rows, block=block, out_dtype=jnp.float32, **kw)
    u = gmm_ops.gmm(xs, w_up, plan.group_rows, block=block, out_dtype=jnp.float32, **kw)
    h = (jax.nn.silu(g) * u).astype(x.dtype)
    ys = gmm_ops.gmm(h, w_down, plan.group_rows, block=block, **kw)  # [R, D]
    w = weights if keep is None else jnp.where(keep, weights, 0)
    return permute_ops.combine(ys, w.astype(jnp.float32), plan, **kw).astype(x.dtype)


def pallas_row_tile(num_pairs: int, num_experts: int, platform: str = "gpu", interpret: bool = False) -> int:
    """Row tile of the Pallas grouped matmul. GPU: each expert pads to a multiple of it (half a tile on
    average), so keep it near a quarter of the mean rows per expert, within Triton's [16, 64] (down to 8
    when interpreting); TPU: megablox's m tile (no per-expert padding)."""
    block = gmm_ops.BlockSizes.get_default(platform)
    if platform != "gpu":
        return block.bm
    quarter = common.next_pow2(-(-num_pairs // num_experts) // 4 + 1) // 2
    return max(8 if interpret else 16, min(block.bm, quarter))
