"""Hugging Face checkpoint folders <-> jaxmoe state, through the `hf_mapping` table.

`HFCheckpoint` resolves tensor names through model.safetensors.index.json (or every *.safetensors
file), dequantises FP8 weights with their 128x128 `weight_scale_inv` blocks, and reports missing
or unexpected tensors by name. `load_model` builds a DeepseekV3 from such a folder.
"""

from __future__ import annotations

import os
import warnings
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmoe import hf_mapping
from jaxmoe.config import ConfigError, ModelConfig, read_json_object
from jaxmoe.model import DeepseekV3
from jaxmoe.quant.fp8 import SCALE_SUFFIX, dequantize_rows
from jaxmoe.safetensors_io import CheckpointError, SafetensorsFile

FP8_BLOCK = 128


def dequantize_fp8(w: np.ndarray, scale_inv: np.ndarray, block: int | tuple[int, int] = FP8_BLOCK,
                   name: str = "?") -> np.ndarray:
    """W[r, c] = float(W_fp8[r, c]) * scale_inv[r // br, c // bc], float32 (spec §6), a
    block-row at a time (`quant.fp8.dequantize_rows`); wrong scale shapes and non-finite
    products raise naming the tensor."""
    block = (block, block) if isinstance(block, int) else tuple(block)
    return dequantize_rows(w, scale_inv, 0, block, np.float32, name)


class HFCheckpoint:
    """A Hugging Face checkpoint folder: config.json plus one or more safetensors files."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise CheckpointError(f"{self.path}: not a checkpoint folder")
        self.config_path = os.path.join(self.path, "config.json")
        if not os.path.exists(self.config_path):
            raise CheckpointError(f"{self.path}: no config.json")
        self.config_json = read_json_object(self.config_path, CheckpointError)
        index = os.path.join(self.path, "model.safetensors.index.json")
        self.weight_map: dict[str, str] = {}
        if os.path.exists(index):
            self.weight_map = read_weight_map(index)
            for fname in sorted(set(self.weight_map.values())):
                if not os.path.exists(os.path.join(self.path, fname)):
                    raise CheckpointError(f"{self.path}: shard {fname} listed in "
                                          "model.safetensors.index.json is missing")
        else:
            files = sorted(f for f in os.listdir(self.path) if f.endswith(".safetensors"))
            if not files:
                raise CheckpointError(f"{self.path}: no *.safetensors files")
            for fname in files:
                for k in SafetensorsFile(os.path.join(self.path, fname)).keys():
                    self.weight_map[k] = fname
        self._files: dict[str, SafetensorsFile] = {}
        self.fp8_block = fp8_block_of(self.config_json, self.config_path)

    def file(self, fname: str) -> SafetensorsFile:
        if fname not in self._files:
            self._files[fname] = SafetensorsFile(os.path.join(self.path, fname))
        return self._files[fname]

    def names(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def raw(self, name: str) -> np.ndarray:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.path}: tensor {name!r} missing from the checkpoint")
        f = self.file(self.weight_map[name])
        if name not in f.header:
            raise CheckpointError(f"{f.path}: tensor {name!r} listed in the index is not in the file")
        return f.get(name)

    def scale_of(self, name: str) -> np.ndarray:
        """The `weight_scale_inv` of FP8 tensor `name` (raw)."""
        sname = name + SCALE_SUFFIX
        if sname not in self.weight_map:
            raise CheckpointError(f"{self.path}: FP8 tensor {name!r} has no scale {sname!r}")
        return self.raw(sname)

    def get(self, name: str) -> np.ndarray:
        """The tensor, FP8 dequantised to float32 with its block scales when stored as FP8."""
        a = self.raw(name)
        if a.dtype.name.startswith("float8"):
            return dequantize_fp8(a, self.scale_of(name), self.fp8_block, name)
        return a


def read_weight_map(index: str) -> dict[str, str]:
    """model.safetensors.index.json's `weight_map` (tensor name -> shard file), checked."""
    wm = read_json_object(index, CheckpointError).get("weight_map")
    if not isinstance(wm, dict):
        found = "none" if wm is None else f"a {type(wm).__name__}"
        raise CheckpointError(f"{index}: needs a 'weight_map' object (tensor name -> shard "
                              f"file), found {found}")
    for name, fname in wm.items():
        if not isinstance(fname, str) or not fname:
            raise CheckpointError(f"{index}: weight_map[{name!r}] = {fname!r}: expected a shard "
                                  "file name")
    return dict(wm)


def fp8_block_of(config_json: dict, config_path: str) -> tuple[int, int]:
    """quantization_config.weight_block_size (default 128x128), checked."""
    qc = config_json.get("quantization_config") or {}
    if not isinstance(qc, dict):
        raise CheckpointError(f"{config_path}: quantization_config = {qc!r}: expected an object")
    block = qc.get("weight_block_size")
    if block is None:
        return (FP8_BLOCK, FP8_BLOCK)
    if (not isinstance(block, list) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise CheckpointError(f"{config_path}: quantization_config.weight_block_size = {block!r}: "
                              "expected two positive integers")
    return tuple(block)


def model_config_for(ckpt: HFCheckpoint, dtype: str, mtp: str | bool = "auto", **overrides
                     ) -> ModelConfig:
    """The checkpoint's ModelConfig; an unusable config.json raises CheckpointError naming it."""
    try:
        cfg = ModelConfig.from_hf_config(ckpt.config_json, source=ckpt.config_path,
                                         param_dtype=dtype, dtype=dtype, **overrides)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    n = cfg.num_nextn_predict_layers
    present = n and f"model.layers.{cfg.num_hidden_layers}.eh_proj.weight" in ckpt
    if mtp == "auto":
        if n and not present:
            warnings.warn(f"{ckpt.path}: config has num_nextn_predict_layers={n} but no MTP "
                          "tensors; loading without the MTP module", stacklevel=3)
        n = n if present else 0
    elif mtp and not present:
        raise CheckpointError(f"{ckpt.path}: MTP requested but model.layers."
                              f"{cfg.num_hidden_layers}.* tensors are missing")
    elif not mtp:
        n = 0
    return cfg.replace(num_nextn_predict_layers=n)


def state_from_hf(cfg: ModelConfig, get, target_shapes: dict, entries=None
                  ) -> Iterator[tuple[tuple, np.ndarray]]:
    """Fill whole arrays for every state path from tensors fetched by `get(name)`.

    Yields (path, float32 array). `target_shapes` maps path -> shape (from the abstract model);
    `entries` are the `hf_mapping` rows filling them (default: all of the config's).
    """
    buffers: dict[tuple, np.ndarray] = {}
    for e in (hf_mapping.entries(cfg) if entries is None else entries):
        if e.path not in target_shapes:
            raise CheckpointError(f"mapping row {e.hf_name} -> {e.path} has no model parameter")
        shape = target_shapes[e.path]
        raw = np.asarray(get(e.hf_name), np.float32)
        want = tuple(shape[len(e.index):])
        try:
            a = e.to_jaxmoe(raw, cfg)
        except ValueError:  # rows not divisible into heads
            a = None
        if a is None or a.shape != want:
            raise CheckpointError(f"tensor {e.hf_name!r}: shape {raw.shape} does not fit parameter "
                                  f"{'/'.join(map(str, e.path))} {tuple(shape)}")
        if not e.index:
            buffers[e.path] = a
        else:
            buf = buffers.setdefault(e.path, np.zeros(shape, np.float32))
            buf[e.index] = a
    missing = set(target_shapes) - set(buffers)
    if missing:
        raise CheckpointError(f"no checkpoint tensor fills parameter(s) {sorted(missing)}")
    yield from buffers.items()


def check_unexpected(ckpt: HFCheckpoint, cfg: ModelConfig) -> None:
    """Refuse checkpoint tensors the model has no parameter for, naming them (scales, the MTP
    layer of a config loaded without MTP and empty tensors excepted)."""
    expected = {e.hf_name for e in hf_mapping.entries(cfg)}
    # transformers writes zero-size shared_experts tensors when n_shared_experts == 0.
    extra = [n for n in ckpt.names() if n not in expected and not n.endswith(SCALE_SUFFIX)
             and not (n.startswith(f"model.layers.{cfg.num_hidden_layers}.")
                      and cfg.num_nextn_predict_layers == 0)
             and ckpt.raw(n).size > 0]
    if extra:
        raise CheckpointError(f"{ckpt.path}: unexpected tensor(s) not in the model: "
                              f"{sorted(extra)[:8]}{' ...' if len(extra) > 8 else ''}")


def abstract_model(cfg: ModelConfig) -> DeepseekV3:
    return nnx.eval_shape(lambda: DeepseekV3(cfg, rngs=nnx.Rngs(0)))


def load_model(path: str | os.PathLike, dtype: str = "float32", mtp: str | bool = "auto",
               strict: bool = True, **overrides) -> DeepseekV3:
    """Load a Hugging Face DeepSeek-V2/V3 checkpoint folder as a DeepseekV3 (params in `dtype`).

    Raises CheckpointError naming the tensor for missing, unexpected or misshapen tensors.
    """
    ckpt = HFCheckpoint(path)
    cfg = model_config_for(ckpt, dtype, mtp, **overrides)
    model = abstract_model(cfg)
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    shapes = {p: tuple(v.get_value().shape) for p, v in flat}
    if strict:
        check_unexpected(ckpt, cfg)
    arrays = dict(state_from_hf(cfg, ckpt.get, shapes))
    for p, v in flat:
        v.set_value(jnp.asarray(arrays[p], dtype=v.get_value().dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def state_to_hf(cfg: ModelConfig, state: nnx.State) -> dict[str, np.ndarray]:
    """Published-name tensors ([out, in] layout, float32) from a model state (or gradients)."""
    flat = {p: np.asarray(jax.device_get(v.get_value() if hasattr(v, "get_value") else v),
                          np.float32)
            for p, v in nnx.to_flat_state(state)}
    out = {}
    for e in hf_mapping.entries(cfg):
        if e.path in flat:
            out[e.hf_name] = e.to_hf(flat[e.path][e.index], cfg)
    return out
