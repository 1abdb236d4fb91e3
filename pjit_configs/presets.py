"""The mesh presets. Each is a few lines of data; `get(name)` also parses the GPU-cluster
family `h100-<N>x8` / `h200-<N>x8` (N nodes of 8 GPUs).

Rule sets (logical axis -> mesh axes):

- SLICE: within one slice / node. Dense weights are FSDP-sharded over `fsdp` and `expert` along
  their `embed` axis (or their q/kv-LoRA rank, for the up-projections that have no `embed`); routed experts over `expert` (their `embed` then keeps `fsdp` only);
  heads, MLP width, vocabulary over `tensor`; the batch over dcn, data, fsdp and expert. The dcn
  axis is pure data parallelism: TPU slices talk over the data-centre network, which is too slow
  for per-layer weight gathers or token all-to-alls.
- CLUSTER: GPU nodes on InfiniBand. 671B does not fit one node's HBM, so experts and dense FSDP
  also span the nodes (DeepSeek's own training ran EP 64 across 8 nodes).

EP variants: TPU slices use `ragged_a2a` (MaxText's default); one GPU node the all-gather ring
(faster than ragged all-to-all at EP <= 8 on GPUs, jax-peers.md section 4); GPU clusters the
fixed-buffer all-to-all at capacity factor 2 (buffers 2x the mean load; overflow is dropped and
counted): at EP 256 the ring and the dropless buffers would hold 256x a device's tokens.

HBM figures are the vendors' per-device capacities (GiB): v5p 95, v6e 32, H100 80, H200 141.
TPU names follow Google's: v5p-N has N TensorCores = N/2 chips; v6e-N has N chips.
"""

from __future__ import annotations

import re

from jaxmoe import axes as A
from pjit_configs import rules as R
from pjit_configs.mesh import MeshPreset, PresetError

BATCH = ("dcn", "data", "fsdp", "expert")

SLICE = R.normalize([
    (A.LAYERS, None),
    (A.EMBED, ("fsdp", "expert")),
    (A.VOCAB, "tensor"),
    (A.HEADS, "tensor"),
    (A.HEAD_DIM, None),
    (A.Q_LORA, ("fsdp", "expert")),
    (A.KV_LORA, ("fsdp", "expert")),
    (A.MLP, "tensor"),
    (A.EXPERT, "expert"),
    (A.EXPERT_MLP, "tensor"),
    (A.NORM, None),
    (A.ACT_BATCH, BATCH),
    (A.ACT_TOKENS, BATCH),
    (A.ACT_SEQ, None),
    (A.ACT_EMBED, None),
    (A.ACT_HEADS, "tensor"),
])

CLUSTER = R.override(SLICE, R.normalize([
    (A.EMBED, ("dcn", "fsdp", "expert")),
    (A.Q_LORA, ("dcn", "fsdp", "expert")),
    (A.KV_LORA, ("dcn", "fsdp", "expert")),
    (A.EXPERT, ("dcn", "expert")),
]))

PRESETS: dict[str, MeshPreset] = {}


def add(p: MeshPreset) -> MeshPreset:
    PRESETS[p.name] = p
    return p


# ----------------------------------------------------------------- simulated CPU (tests)
add(MeshPreset("cpu-8", SLICE, fsdp=2, expert=2, tensor=2, ep="allgather",
               note="8 fake CPU devices: FSDP x EP x TP, 2 each"))
add(MeshPreset("cpu-8-dp", SLICE, data=8,
               note="8 fake CPU devices, pure data parallelism (parameters replicated)"))
add(MeshPreset("cpu-2x4", CLUSTER, dcn=2, fsdp=2, expert=2, ep="allgather",
               note="2 processes x 4 CPU devices (gloo): experts and FSDP across processes"))

# ----------------------------------------------------------------------------------- TPU
add(MeshPreset("v5p-256", SLICE, fsdp=2, expert=64, ep="ragged_a2a", device="TPU v5p",
               hbm_gib=95, note="128 chips (one v5p-256 slice)"))
add(MeshPreset("v5p-1024", SLICE, fsdp=2, expert=256, ep="ragged_a2a", device="TPU v5p",
               hbm_gib=95, note="512 chips (one v5p-1024 slice): one expert per chip and layer"))
add(MeshPreset("v6e-256", SLICE, fsdp=16, expert=16, ep="ragged_a2a", device="TPU v6e",
               hbm_gib=32, note="256 chips (one slice), MaxText's deepseek_v3_ep16 layout"))
add(MeshPreset("v6e-256x2", SLICE, dcn=2, fsdp=16, expert=16, ep="ragged_a2a",
               device="TPU v6e", hbm_gib=32, note="2 v6e-256 slices, data-parallel over DCN"))

# ----------------------------------------------------------------------------------- GPU
GPUS = {"h100": ("NVIDIA H100", 80.0), "h200": ("NVIDIA H200", 141.0)}
for _gpu, (_kind, _hbm) in GPUS.items():
    add(MeshPreset(f"{_gpu}-8", SLICE, expert=8, ep="allgather", device=_kind, hbm_gib=_hbm,
                   note="one 8-GPU node (NVLink): EP 8, dense weights FSDP 8"))

_CLUSTER_NAME = re.compile(r"^(h100|h200)-(\d+)x8$")


def gpu_cluster(gpu: str, nodes: int) -> MeshPreset:
    """N nodes x 8 GPUs: experts and dense FSDP over all N*8 GPUs, one process per node."""
    kind, hbm = GPUS[gpu]
    return MeshPreset(f"{gpu}-{nodes}x8", CLUSTER, dcn=nodes, expert=8, ep="a2a_fixed",
                      capacity_factor=2.0, device=kind, hbm_gib=hbm,
                      note=f"{nodes} nodes x 8 GPUs: EP and FSDP over all {8 * nodes}")


def names() -> list[str]:
    return sorted(PRESETS) + ["h100-<N>x8", "h200-<N>x8"]


def get(name: str) -> MeshPreset:
    if name in PRESETS:
        return PRESETS[name]
    m = _CLUSTER_NAME.match(name)
    if m and int(m.group(2)) >= 1:
        return gpu_cluster(m.group(1), int(m.group(2)))
    raise PresetError(f"unknown mesh preset {name!r}; known: {', '.join(names())}")
