"""The expert-parallel scope: which mesh axes carry experts and tokens, and which EP variant runs.

The MoE layer stays mesh-agnostic: it asks `current_ep()` and, when a scope is active, hands its
routed experts to `jaxmoe.parallel.ep`. Mesh presets (pjit_configs) open the scope; tests and
scripts can open it directly. The scope is read at trace time, so open it around `jax.jit` tracing.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

from jax.sharding import Mesh

VARIANTS = ("a2a_fixed", "ragged_a2a", "allgather")


@dataclasses.dataclass(frozen=True)
class EPSpec:
    mesh: Mesh
    expert_axis: str | tuple[str, ...]          # mesh axis (or axes) the expert dimension is split over
    token_axes: tuple[str, ...] = ()            # mesh axes the token (batch) dimension is split over
    variant: str = "allgather"                  # one of VARIANTS
    capacity_factor: float | None = None        # a2a_fixed: per-peer buffer = factor x mean load;
                                                # None = dropless worst case

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"EP variant {self.variant!r} unknown; choose one of {VARIANTS}")
        names = (self.expert_axis,) if isinstance(self.expert_axis, str) else tuple(self.expert_axis)
        for a in names + tuple(self.token_axes):
            if a not in self.mesh.axis_names:
                raise ValueError(f"EP axis {a!r} is not in the mesh axes {self.mesh.axis_names}")


_CURRENT: contextvars.ContextVar[EPSpec | None] = contextvars.ContextVar("jaxmoe_ep", default=None)


def current_ep() -> EPSpec | None:
    return _CURRENT.get()


@contextlib.contextmanager
def ep_scope(spec: EPSpec | None):
    """Run MoE layers traced inside this block expert-parallel per `spec` (None: single-device)."""
    token = _CURRENT.set(spec)
    try:
        yield spec
    finally:
        _CURRENT.reset(token)
