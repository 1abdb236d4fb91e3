"""Logical axis names -> PartitionSpecs / NamedShardings, for parameters, optimizer state and
activations. The model names only logical axes (`jaxmoe.axes`, carried by every nnx.Param as its
`out_sharding` metadata); a `Layout` (a mesh plus a checked rule table, built from a
`pjit_configs` preset) turns them into shardings from outside the model.

Per tensor, `spec_for` resolves the rules dimension by dimension, left to right:
- a mesh axis already taken by an earlier dimension of the same tensor is dropped from the later
  one (the expert dimension of `w_gate_EDF` takes `expert`, so its `embed` keeps only `fsdp`),
- mesh axes of size 1 are dropped (specs name only axes that split something),
- trailing mesh axes are dropped until the dimension divides evenly (XLA would pad uneven shards;
  we replicate instead, and the golden dumps in tests/golden make every such case visible).

`constrain(x, logical_axes)` pins an activation's sharding under the active layout and is a no-op
without one, so model code stays single-device.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxmoe import axes
from jaxmoe.parallel.context import EPSpec, ep_scope

Rule = tuple[str, tuple[str, ...]]


class RulesError(ValueError):
    """Rules that cannot be applied; the message names the rules (or the tensor) involved."""


def mesh_axes_for(logical: str | None, table: Mapping[str, Rule], where: str = "") -> tuple[str, ...]:
    if logical is None:
        return ()
    if logical not in table:
        raise RulesError(f"{where}: no rule for logical axis {logical!r} (rules cover "
                         f"{sorted(table)})")
    return table[logical][1]


def spec_for(logical: Sequence[str | None], shape: Sequence[int], table: Mapping[str, Rule],
             axis_sizes: Mapping[str, int], where: str = "tensor") -> PartitionSpec:
    """The PartitionSpec of one tensor with these logical axes and this shape (rules above)."""
    if len(logical) != len(shape):
        raise RulesError(f"{where}: {len(logical)} logical axes {tuple(logical)} for a "
                         f"{len(shape)}-d shape {tuple(shape)}")
    used: set[str] = set()
    out: list[Any] = []
    for name, size in zip(logical, shape):
        cand = [a for a in mesh_axes_for(name, table, where)
                if a not in used and axis_sizes[a] > 1]
        while cand and size % math.prod(axis_sizes[a] for a in cand):
            cand.pop()
        used.update(cand)
        out.append(None if not cand else cand[0] if len(cand) == 1 else tuple(cand))
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def logical_axes_of(var: nnx.Variable) -> tuple | None:
    return var.get_metadata().get("out_sharding")


def path_str(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return ".".join(p for p in parts if p != "value")


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def tree_specs(tree, table: Mapping[str, Rule], axis_sizes: Mapping[str, int]):
    """`tree` with every array leaf replaced by its PartitionSpec: a Variable with logical axes
    (parameters, and optimizer moments, which optax builds as copies of the parameters) gets
    its rules' spec; everything else (step counters, RNG keys, unannotated variables) P()."""

    def one(path, x):
        if _is_var(x):
            logical = logical_axes_of(x)
            shape = x.get_value().shape
            spec = (PartitionSpec() if logical is None else
                    spec_for(logical, shape, table, axis_sizes, where=path_str(path)))
            return x.replace(spec)
        return PartitionSpec()

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=_is_var)


# ---------------------------------------------------------------------------------- layout
class Layout:
    """A mesh, its checked rule table and the expert-parallel spec: everything needed to place
    the train state and the batch, and to trace the model expert-parallel."""

    def __init__(self, mesh: Mesh, rules: Sequence[Rule], ep: EPSpec | None = None,
                 name: str = ""):
        self.mesh, self.ep, self.name = mesh, ep, name
        self.table = {r[0]: r for r in rules}
        self.axis_sizes = dict(mesh.shape)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def spec(self, logical: Sequence[str | None], shape: Sequence[int], where: str = "tensor"):
        return spec_for(logical, shape, self.table, self.axis_sizes, where)

    def specs(self, tree):
        return tree_specs(tree, self.table, self.axis_sizes)

    def shardings(self, tree):
        """`tree` (a train state, concrete or abstract) -> the same tree of NamedShardings."""
        return jax.tree.map(lambda s: NamedSharding(self.mesh, s), self.specs(tree),
                            is_leaf=lambda x: isinstance(x, PartitionSpec))

    @property
    def batch_axes(self) -> tuple[str, ...]:
        """Mesh axes (of size > 1) the batch dimension is split over."""
        return tuple(a for a in mesh_axes_for(axes.ACT_BATCH, self.table, "batch")
                     if self.axis_sizes[a] > 1)

    @property
    def batch_shards(self) -> int:
        return math.prod(self.axis_sizes[a] for a in self.batch_axes)

    def batch_sharding(self, batch_dim: int = 0) -> NamedSharding:
        """Rows split over the batch axes (trainer batches [A, B, T+1] use batch_dim=1)."""
        b = self.batch_axes
        entry = None if not b else b[0] if len(b) == 1 else b
        return NamedSharding(self.mesh, PartitionSpec(*([None] * batch_dim), entry))

    @contextlib.contextmanager
    def scope(self):
        """Trace inside this block: the model's activation pins (residual stream, attention
        heads) follow the rules, and the MoE runs expert-parallel per `self.ep`. It acts at
        trace time: open it around the first call (or `.lower`) of a jitted function; a
        function already traced outside it keeps its unpinned program."""
        token = _ACTIVE.set(self)
        try:
            with ep_scope(self.ep):
                yield self
        finally:
            _ACTIVE.reset(token)


_ACTIVE: contextvars.ContextVar[Layout | None] = contextvars.ContextVar("jaxmoe_layout",
                                                                        default=None)


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """Pin activation `x` (logical axes per dimension) to the active layout's sharding; x itself
    when no layout is active (single device, tests, inference)."""
    layout = _ACTIVE.get()
    if layout is None:
        return x
    spec = layout.spec(logical, x.shape, where=f"activation {tuple(logical)}")
    return jax.lax.with_sharding_constraint(x, NamedSharding(layout.mesh, spec))
