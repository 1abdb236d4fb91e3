"""Expert parallelism: the routed experts of a MoE layer in one `jax.shard_map` over the EP mesh.

`MoE.__call__` routes (router, counts, balance term: all global, under GSPMD) and, when an `ep_scope` is
open, hands its routed experts here instead of to `dispatch.experts_swiglu`. Inside the shard_map each
device holds E / ep experts (w_gate/w_up/w_down split on E over the expert axis; any other sharding of
them, e.g. FSDP on D, is all-gathered by the partitioner at the shard_map boundary) and its token rows;
the local expert math is `dispatch.experts_swiglu` with local expert ids (the configured moe_impl).

Variants (`EPSpec.variant`; bytes per token: BENCHMARKS.md "Expert parallelism"):
- "allgather" (ring of experts; the CPU fallback): all-gather the tokens and their top-k over the expert
  axis, every device computes its local experts' share for all of them, reduce-scatter (psum_scatter)
  the sums back. Communicates tokens before the x K replication. Dropless.
- "a2a_fixed": all-to-all of fixed [C, D] per-destination buffers (`ep_a2a.fixed_a2a`): dropless worst
  case, or a capacity factor with overflow counted into aux["dropped"]. Runs on every backend.
- "ragged_a2a": `jax.lax.ragged_all_to_all` (`ep_a2a.ragged_a2a`): only routed rows travel. TPU and GPU;
  XLA:CPU does not implement the collective, so selecting it on CPU raises.

Token layout. GSPMD hands the shard_map whatever layout the surrounding program chose for the rows; the
in_specs ask for one and the partitioner reshards on entry and exit, so the layout choice is here:
- the all-to-alls take rows split over the token axes AND the expert axes, and return them so. When the
  expert axis is among `EPSpec.token_axes` (batch sharded over it, MaxText's `activation_batch` rule)
  that is the caller's layout: nothing moves outside the shard_map. When the rows arrive replicated over
  the expert axis (attention sharded over data only), the partitioner slices each device's share on
  entry (local, free) and all-gathers y after the shard_map; in the backward it all-gathers d x (the
  transpose of the slice), where a slice taken inside the shard_map would transpose to an all-reduce
  (unchecked shard_map cannot tell that the cotangent is replicated).
- the ring takes the rows as the token axes split them: when they are split over the expert axis it
  all-gathers them; when replicated, every device already holds them and the gather is skipped. Either
  way it reduce-scatters its partial sums into rows split over the token and expert axes (the
  partitioner all-gathers them where the caller needs them replicated).
BENCHMARKS.md "Expert parallelism" measures what each layout costs. Rows are zero-padded to a multiple of
the row shards (decode batches); pad rows route nowhere.

Gradients: plain autodiff through the collectives (all_gather <-> psum_scatter, all_to_all <-> itself,
ragged_all_to_all's own transpose) and the dispatch's VJPs. `check_vma=False`, as in MaxText: the
dispatch's loops start from unvarying zero carries; the tests compare every gradient with the
single-device layer.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmoe.kernels import dispatch
from jaxmoe.parallel import ep_a2a
from jaxmoe.parallel.context import VARIANTS, EPSpec


@dataclasses.dataclass(frozen=True)
class EPLayout:
    expert_axes: tuple[str, ...]
    token_axes: tuple[str, ...]
    ep: int               # devices along the expert axes
    token_shards: int     # devices along the token axes
    split: bool           # token rows already split over the expert axes

    @property
    def axis(self) -> str | tuple[str, ...]:
        return self.expert_axes[0] if len(self.expert_axes) == 1 else self.expert_axes

    @property
    def distinct_axes(self) -> tuple[str, ...]:
        """The row split of the all-to-alls and of the ring's output: token axes, then the expert axes (the
        a2a bodies see distinct rows over these; their drop counts are summed over them)."""
        return self.token_axes + tuple(a for a in self.expert_axes if a not in self.token_axes)


def layout(spec: EPSpec) -> EPLayout:
    sizes = dict(zip(spec.mesh.axis_names, spec.mesh.axis_sizes))
    ex = (spec.expert_axis,) if isinstance(spec.expert_axis, str) else tuple(spec.expert_axis)
    tok = tuple(spec.token_axes)
    inside = [a in tok for a in ex]
    if any(inside) and not all(inside):
        raise ValueError(f"EPSpec: the token axes {tok} hold some but not all of the expert axes {ex}; "
                         "split the tokens over all of them or none")
    return EPLayout(ex, tok, math.prod(sizes[a] for a in ex), math.prod(sizes[a] for a in tok), all(inside))


def check_backend(spec: EPSpec) -> None:
    """"ragged_a2a" cannot run on XLA:CPU; say so before tracing (an AbstractMesh, used to export for
    TPU/GPU, has no devices and passes)."""
    if spec.variant != "ragged_a2a" or not isinstance(spec.mesh, Mesh) or ep_a2a.simulated():
        return
    platform = spec.mesh.devices.flat[0].platform
    if platform == "cpu":
        raise NotImplementedError(
            "EPSpec(variant='ragged_a2a') needs jax.lax.ragged_all_to_all, which XLA:CPU does not implement "
            "(jax-ml/jax#34755); on CPU choose variant='a2a_fixed' (fixed-size all-to-all buffers) or "
            "'allgather' (ring of experts)")


def _spec(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def experts_swiglu_ep(x: jax.Array, weights: jax.Array, experts: jax.Array, w_gate: jax.Array,
                      w_up: jax.Array, w_down: jax.Array, *, spec: EPSpec, impl: str,
                      keep: jax.Array | None = None, tile: int | None = None
                      ) -> tuple[jax.Array, jax.Array | None]:
    """The routed experts, expert-parallel. x [M, D], weights/experts [M, K] (global arrays, any
    sharding), w_gate/w_up [E, D, F], w_down [E, F, D]; keep [M, K]: pairs the model's own capacity kept.

    Returns (y [M, D], dropped): dropped = the (token, expert) pairs the EP buffers could not hold,
    summed over all devices (int32), or None when the variant is dropless (no capacity factor)."""
    if spec.variant not in VARIANTS:
        raise ValueError(f"EP variant {spec.variant!r} unknown; choose one of {VARIANTS}")
    check_backend(spec)
    lay = layout(spec)
    M = experts.shape[0]
    E = w_gate.shape[0]
    if E % lay.ep:
        raise ValueError(f"EP: n_routed_experts={E} is not divisible by the {lay.ep} devices of the "
                         f"expert axis {lay.expert_axes}")
    if spec.variant == "allgather" and spec.capacity_factor is not None:
        raise ValueError("EPSpec.capacity_factor applies to the all-to-all variants ('a2a_fixed', "
                         "'ragged_a2a'); 'allgather' is always dropless")
    ctx = ep_a2a.Local(lay.axis, lay.ep, E // lay.ep, impl, tile, spec.capacity_factor)
    if keep is not None:  # expert id E: routed nowhere (on no device's range)
        experts = jnp.where(keep, experts, E)
    ring = spec.variant == "allgather"
    # rows each device works on: split over the token axes and the expert axes (the all-to-alls; the
    # ring's output), or over the token axes only (the ring's input: it gathers them anyway)
    split_rows = P(_spec(lay.distinct_axes))
    in_rows = P(_spec(lay.token_axes)) if ring else split_rows
    pad = -experts.shape[0] % (lay.token_shards * (1 if lay.split else lay.ep))
    if pad:  # [M + pad, ...] zero rows routed nowhere
        x = jnp.pad(x, ((0, pad), (0, 0)))
        weights = jnp.pad(weights, ((0, pad), (0, 0)))
        experts = jnp.pad(experts, ((0, pad), (0, 0)), constant_values=E)
    counted = not ring and spec.capacity_factor is not None

    def body(x, w, e, wg, wu, wd):
        if ring:
            return ring_experts(x, w, e, wg, wu, wd, ctx, gather=lay.split), jnp.zeros((), jnp.int32)
        fn = ep_a2a.fixed_a2a if spec.variant == "a2a_fixed" else ep_a2a.ragged_a2a
        y, dropped = fn(x, w, e, wg, wu, wd, ctx)
        return y, (jax.lax.psum(dropped, lay.distinct_axes) if counted else dropped)

    wspec = P(_spec(lay.expert_axes))
    in_specs = (in_rows, in_rows, in_rows, wspec, wspec, wspec)
    args = (x, weights, experts, w_gate, w_up, w_down)
    explicit = any(t == jax.sharding.AxisType.Explicit for t in spec.mesh.axis_types)
    if explicit:  # sharding in types: the shard_map takes its in_specs layout, the caller gets its own back
        x_rows = NamedSharding(spec.mesh, jax.typeof(x).sharding.spec)
        args = tuple(jax.sharding.reshard(a, NamedSharding(spec.mesh, s)) for a, s in zip(args, in_specs))
    y, dropped = jax.shard_map(body, mesh=spec.mesh, in_specs=in_specs, out_specs=(split_rows, P()),
                               check_vma=False)(*args)
    if explicit:
        y = jax.sharding.reshard(y, x_rows)
    return y[:M], (dropped if counted else None)


def ring_experts(x, w, e, wg, wu, wd, ctx: ep_a2a.Local, gather: bool) -> jax.Array:
    """Ring of experts: (all-gather the rows over the expert axis,) this device's experts on all of them,
    then reduce-scatter the partial sums: x [m, D] -> [m / ep, D] (rows split over the expert axis)."""
    if gather:  # [ep*m, ...]
        x, w, e = (jax.lax.all_gather(a, ctx.axis, axis=0, tiled=True) for a in (x, w, e))
    loc = e - jax.lax.axis_index(ctx.axis) * ctx.n_local
    mine = (loc >= 0) & (loc < ctx.n_local)
    y = dispatch.experts_swiglu(x, w, jnp.where(mine, loc, 0), wg, wu, wd, impl=ctx.impl, tile=ctx.tile,
                               keep=mine)
    return jax.lax.psum_scatter(y, ctx.axis, scatter_dimension=0, tiled=True)
