"""`MeshPreset`: a declarative mesh (axis sizes), its logical -> mesh rules, the expert-parallel
variant and the chip it was sized for; `make_mesh` lays it over the available devices.

Every preset has the same five mesh axes, outermost first (size 1 where unused), so one rule
vocabulary serves all of them:

    dcn     slices (TPU multi-slice) or nodes (GPU clusters): the slow links
    data    pure data parallelism (parameters replicated)
    fsdp    data parallelism with parameters / optimizer state sharded (ZeRO-3)
    expert  routed experts split across devices (tokens also split over it outside the MoE)
    tensor  heads / MLP width split (Megatron-style tensor parallelism)
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from jax.sharding import Mesh

from jaxmoe import axes
from jaxmoe.parallel.context import VARIANTS, EPSpec
from jaxmoe.parallel.sharding import Layout, Rule, mesh_axes_for
from pjit_configs import rules as rules_lib

MESH_AXES = ("dcn", "data", "fsdp", "expert", "tensor")
EP_CHOICES = VARIANTS + ("none",)


class PresetError(ValueError):
    """A preset that cannot be used here; the message names the preset and what was found."""


@dataclasses.dataclass(frozen=True)
class MeshPreset:
    name: str
    rules: tuple[Rule, ...]
    dcn: int = 1
    data: int = 1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1
    ep: str = "none"                     # EP dispatch (jaxmoe.parallel.context.VARIANTS) or none
    capacity_factor: float | None = None  # a2a_fixed buffers: factor x mean load; None = dropless
    device: str = "cpu"                  # what it was sized for (plan: HBM; docs)
    hbm_gib: float = 0.0                 # memory per device for the plan's fit check (0: unknown)
    note: str = ""

    def __post_init__(self):
        for a in MESH_AXES:
            if getattr(self, a) < 1:
                raise PresetError(f"mesh preset {self.name!r}: axis {a}={getattr(self, a)} "
                                  "must be >= 1")
        if self.ep not in EP_CHOICES:
            raise PresetError(f"mesh preset {self.name!r}: ep={self.ep!r}; choose one of "
                              f"{EP_CHOICES}")
        rules_lib.check(self.rules, MESH_AXES, where=f"mesh preset {self.name!r}")

    # -------------------------------------------------------------------------------- shape
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, a) for a in MESH_AXES)

    @property
    def axis_sizes(self) -> dict[str, int]:
        return dict(zip(MESH_AXES, self.shape))

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def describe(self) -> str:
        return " x ".join(f"{a} {n}" for a, n in self.axis_sizes.items() if n > 1) or "1 device"

    def replace(self, **kw) -> "MeshPreset":
        return dataclasses.replace(self, **kw)

    # -------------------------------------------------------------------------------- mesh
    def make_mesh(self, devices=None) -> Mesh:
        """The mesh over `devices` (default: every device of every process). Raises
        PresetError naming the preset's shape and the devices found when the counts differ."""
        import jax

        devices = list(jax.devices() if devices is None else devices)
        if len(devices) != self.size:
            kinds = sorted({f"{d.platform}:{d.device_kind}" for d in devices})
            procs = len({d.process_index for d in devices})
            raise PresetError(
                f"mesh preset {self.name!r} needs {self.size} devices ({self.describe()}; sized "
                f"for {self.device}) but {len(devices)} are available ({', '.join(kinds)} in "
                f"{procs} process(es))" + (
                    f"; on a CPU host, XLA_FLAGS=--xla_force_host_platform_device_count="
                    f"{self.size} (set before jax starts) gives {self.size} CPU devices"
                    if procs == 1 and all(d.platform == "cpu" for d in devices) else ""))
        return Mesh(self._device_grid(devices), MESH_AXES)

    def _device_grid(self, devices) -> np.ndarray:
        """Devices arranged as the mesh: the dcn axis over slices (TPU) or processes (GPU and
        CPU clusters: one process per node), the inner axes topology-aware where JAX knows the
        interconnect (TPU, GPU), otherwise in device-id order."""
        from jax.experimental import mesh_utils

        inner = (1,) + self.shape[1:]
        platform = devices[0].platform
        slices = {getattr(d, "slice_index", 0) for d in devices}
        if self.dcn > 1 and platform == "tpu" and len(slices) == self.dcn:
            return mesh_utils.create_hybrid_device_mesh(
                inner, (self.dcn,) + (1,) * (len(MESH_AXES) - 1), devices)
        ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
        if platform in ("tpu", "gpu", "cuda", "rocm") and self.dcn == 1:
            try:
                return mesh_utils.create_device_mesh(self.shape, ordered)
            except (ValueError, NotImplementedError, AssertionError):
                pass  # a shape the topology helper does not know: fall back to id order
        return np.asarray(ordered, dtype=object).reshape(self.shape)  # [n devices] -> the mesh shape

    # ------------------------------------------------------------------------------ layout
    def ep_spec(self, mesh: Mesh) -> EPSpec | None:
        """The expert-parallel scope for this mesh, or None when experts are not split or the
        preset's ep is none (then GSPMD partitions the sharded expert weights by itself)."""
        table = {r[0]: r for r in self.rules}
        experts = tuple(a for a in mesh_axes_for(axes.EXPERT, table) if mesh.shape[a] > 1)
        if self.ep == "none" or not experts:
            return None
        tokens = tuple(a for a in mesh_axes_for(axes.ACT_BATCH, table) if mesh.shape[a] > 1)
        return EPSpec(mesh, experts[0] if len(experts) == 1 else experts, tokens, self.ep,
                      self.capacity_factor)

    def layout(self, devices=None, mesh: Mesh | None = None) -> Layout:
        mesh = self.make_mesh(devices) if mesh is None else mesh
        return Layout(mesh, self.rules, self.ep_spec(mesh), name=self.name)
