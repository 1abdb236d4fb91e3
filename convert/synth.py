"""Synthetic checkpoints in the published DeepSeek-V3 format, for tests and benchmarks.

The real tensor names (`hf_mapping.entries`), FP8 e4m3fn linear weights inside decoder layers
with float32 `weight_scale_inv` [ceil(M/128), ceil(N/128)] (ragged edge blocks zero-padded for
the scale, then cropped, as README_WEIGHTS describes), bf16 embeddings / norms / router / MTP
extras, float32 router bias; sharded with model.safetensors.index.json and a
`quantization_config` in config.json (dsv3-spec §6-§7).

`write_sparse_checkpoint` writes the same layout with real headers but every data region left
as a hole, so the full 671B inventory (641 GiB) takes almost no disk: the converter's planning
and validation can run at the real scale, and holes read as zeros.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Mapping

import ml_dtypes
import numpy as np
from flax import nnx

from jaxmoe import hf_mapping
from jaxmoe.config import ModelConfig
from jaxmoe.hf_io import SCALE_SUFFIX, abstract_model
from jaxmoe.safetensors_io import header_bytes

from convert.export import ShardedWriter
from convert.fp8 import scale_shape
from convert.plan import hf_shape

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
BF16 = np.dtype(ml_dtypes.bfloat16)
QUANT_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                "weight_block_size": [128, 128]}
# Greedy grouping of the 671B inventory at this size gives 163 shards, like the release.
RELEASE_SHARD_BYTES = 4_250_000_000


def quantize_fp8(w: np.ndarray, block=(128, 128)) -> tuple[np.ndarray, np.ndarray]:
    """W float32 [M, N] -> (e4m3fn [M, N], scale_inv float32 [ceil(M/br), ceil(N/bc)]) with
    scale_inv = amax(block) / 448 (1 for an all-zero block); W ~= fp8 * scale_inv."""
    M, N = w.shape
    br, bc = block
    nb = scale_shape((M, N), block)
    p = np.zeros((nb[0] * br, nb[1] * bc), np.float32)
    p[:M, :N] = w
    blocks = p.reshape(nb[0], br, nb[1], bc)  # [M', N'] -> [row blocks, br, col blocks, bc]
    amax = np.abs(blocks).max(axis=(1, 3))
    s = np.where(amax > 0, amax / 448.0, 1.0).astype(np.float32)
    q = np.clip(blocks / s[:, None, :, None], -448, 448).reshape(p.shape)[:M, :N]  # -> [M, N]
    return q.astype(E4M3), s


def tensor_specs(cfg: ModelConfig, fp8: bool, dtype=BF16) -> list[tuple[str, np.dtype, tuple]]:
    """(name, dtype, shape) of every published tensor (scales right after their weights)."""
    flat = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(abstract_model(cfg)))}
    out = []
    for e in hf_mapping.entries(cfg):
        shape = hf_shape(e.transform, tuple(flat[e.path].shape[len(e.index):]), cfg)
        if fp8 and e.fp8_eligible:
            out.append((e.hf_name, E4M3, shape))
            out.append((e.hf_name + SCALE_SUFFIX, np.dtype(np.float32), scale_shape(shape, (128, 128))))
        elif e.hf_name.endswith("e_score_correction_bias"):
            out.append((e.hf_name, np.dtype(np.float32), shape))
        else:
            out.append((e.hf_name, np.dtype(dtype), shape))
    return out


def random_tensor(name: str, dtype: np.dtype, shape: tuple, rng: np.random.Generator,
                  std: float = 0.02) -> np.ndarray:
    """Cheap random data: random non-NaN e4m3 bytes, scales ~ std/100, norms ~ 1."""
    if dtype == E4M3:
        u = rng.integers(0, 256, size=shape, dtype=np.uint8)
        u[(u & 0x7F) == 0x7F] ^= 1  # no NaN codes
        return u.view(E4M3)
    if name.endswith(SCALE_SUFFIX):
        return (std / 100 * (0.5 + rng.random(shape, dtype=np.float32))).astype(np.float32)
    base = 1.0 if name.endswith("norm.weight") else 0.0
    return (base + std * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)


def write_checkpoint(path, cfg: ModelConfig, *, fp8: bool = True, dtype=BF16,
                     tensors: Mapping[str, np.ndarray] | Callable | None = None,
                     seed: int = 0, max_shard_bytes: int = 2 << 30, extra_config: dict | None = None
                     ) -> str:
    """Write a synthetic checkpoint folder. `tensors`: float32 weights by published name (FP8
    ones are quantised here), a callable name -> array, or None for random data. Tensors that
    are not FP8 are stored in `dtype` (the router bias in float32)."""
    os.makedirs(path, exist_ok=True)
    specs = tensor_specs(cfg, fp8, dtype)
    rng = np.random.default_rng(seed)
    w = ShardedWriter(os.fspath(path), specs, max_shard_bytes)
    pending_scale = None
    for name, dt, shape in specs:
        w.begin(name)
        if name.endswith(SCALE_SUFFIX) and pending_scale is not None:
            w.write(pending_scale)
            pending_scale = None
            continue
        if tensors is None:
            a = random_tensor(name, dt, shape, rng)
        else:
            a = np.asarray(tensors(name) if callable(tensors) else tensors[name], np.float32)
            if dt == E4M3:
                a, pending_scale = quantize_fp8(a)
        w.write(a)
    w.close()
    config = cfg.to_hf_config()
    if fp8:
        config["quantization_config"] = dict(QUANT_CONFIG)
    config.update(extra_config or {})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return os.fspath(path)


def write_sparse_checkpoint(path, cfg: ModelConfig, config: dict, *, fp8: bool = True,
                            max_shard_bytes: int = RELEASE_SHARD_BYTES) -> str:
    """Like `write_checkpoint`, but only the headers are written: each shard is extended to its
    full size with `truncate`, so its data regions are holes that read as zeros and take no disk
    blocks (on file systems with sparse files). Shards are named like the release,
    model-00001-of-000163.safetensors; `config` is written as config.json as given."""
    os.makedirs(path, exist_ok=True)
    w = ShardedWriter(os.fspath(path), tensor_specs(cfg, fp8), max_shard_bytes, count_digits=6)
    for fname, group in zip(w.files, w.groups):
        head, size = header_bytes(group, {"format": "pt"})
        with open(os.path.join(path, fname), "wb") as f:
            f.write(head)
            f.truncate(len(head) + size)  # the data: one hole
    w.write_index()
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return os.fspath(path)
