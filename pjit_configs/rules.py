"""Logical -> mesh axis rules, declared as data and checked once when a preset is loaded.

A rule maps one logical axis name (`jaxmoe.axes`) to a tuple of mesh axes (empty: replicated).
Two rules for the same logical name that disagree, an unknown logical name, or a mesh axis the
mesh does not have raise `RulesError` naming the rules involved. How a checked table becomes a
PartitionSpec per tensor is `jaxmoe.parallel.sharding.spec_for`.
"""

from __future__ import annotations

from typing import Sequence

from jaxmoe import axes
from jaxmoe.parallel.sharding import Rule, RulesError

# every logical name the model and the trainer use (parameters and activations)
LOGICAL_AXES = tuple(v for k, v in vars(axes).items() if k.isupper() and isinstance(v, str))


def normalize(rules: Sequence[tuple[str, str | Sequence[str] | None]]) -> tuple[Rule, ...]:
    """(logical, mesh axis | (mesh axes) | None) -> (logical, (mesh axes,))."""
    out = []
    for logical, mesh in rules:
        if mesh is None:
            mesh = ()
        elif isinstance(mesh, str):
            mesh = (mesh,)
        out.append((logical, tuple(mesh)))
    return tuple(out)


def fmt(rule: Rule) -> str:
    return f"{rule[0]!r} -> {rule[1]!r}"


def check(rules: Sequence[Rule], mesh_axes: Sequence[str], where: str = "rules") -> dict[str, Rule]:
    """Validate `rules` against the mesh axis names; returns {logical: rule}. Repeating a rule
    verbatim is allowed (presets extend base rule sets); disagreeing repeats are not."""
    seen: dict[str, Rule] = {}
    for rule in rules:
        logical, mesh = rule
        if logical not in LOGICAL_AXES:
            raise RulesError(f"{where}: rule {fmt(rule)} names logical axis {logical!r}, which "
                             f"jaxmoe.axes does not define (known: {sorted(LOGICAL_AXES)})")
        for a in mesh:
            if a not in mesh_axes:
                raise RulesError(f"{where}: rule {fmt(rule)} names mesh axis {a!r}; the mesh "
                                 f"has {tuple(mesh_axes)}")
        if len(set(mesh)) != len(mesh):
            raise RulesError(f"{where}: rule {fmt(rule)} repeats a mesh axis")
        if logical in seen and seen[logical] != rule:
            raise RulesError(f"{where}: conflicting rules for {logical!r}: {fmt(seen[logical])} "
                             f"and {fmt(rule)}")
        seen[logical] = rule
    return seen


def override(base: Sequence[Rule], changes: Sequence[Rule]) -> tuple[Rule, ...]:
    """`base` with the rules of `changes` replacing those for the same logical names."""
    new = {r[0]: r for r in changes}
    return tuple(new.pop(r[0], r) for r in base) + tuple(new.values())
