"""Mesh presets and logical -> mesh axis rules.

Model code names only the logical axes of `jaxmoe.axes`; everything mesh-specific lives here:
`mesh.py` (the `MeshPreset` dataclass, device layout), `rules.py` (rule checking),
`presets.py` (the presets), `golden.py` (PartitionSpec dumps checked into tests/golden).

    layout = pjit_configs.load("cpu-8")          # Layout: mesh + rules + expert-parallel spec
    state_shardings = layout.shardings(state)    # NamedSharding per leaf, from logical axes
"""

from jaxmoe.parallel.sharding import Layout, RulesError
from pjit_configs.mesh import MESH_AXES, MeshPreset, PresetError
from pjit_configs.presets import PRESETS, get, names


def load(name: str, devices=None, ep: str | None = None) -> Layout:
    """The preset's Layout over `devices` (default: all); `ep` overrides its EP variant."""
    preset = get(name)
    if ep:
        preset = preset.replace(ep=ep)
    return preset.layout(devices)


__all__ = ["Layout", "MESH_AXES", "MeshPreset", "PRESETS", "PresetError", "RulesError", "get",
           "load", "names"]
