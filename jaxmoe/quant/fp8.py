"""FP8-weight inference: linear weights kept as the published checkpoint stores them, e4m3 with
128x128 `weight_scale_inv` blocks (dsv3-spec §6), dequantised inside the matmul path.

`FP8Block` replaces a parameter of the model: `q` float8_e4m3fn in the checkpoint's [out, in]
layout (stacked layers / experts in front), `scale_inv` float32 [..., ceil(out/128),
ceil(in/128)]. Layers read it through `jaxmoe.layers.params.weight`, which calls
`effective_weight`: W = float32(q) * scale_inv[r // 128, c // 128], the `hf_mapping` layout
transform, then the compute dtype - the same float32 product rounded once that the converter
writes, so the logits equal the dequantised model's. Inside the scanned stacks this runs per
layer, so only one layer's weight exists dequantised at a time (XLA fuses the dequantisation and
the layout change into one pass producing the matmul operand); the resident weights are one byte
per element, half of bfloat16.

The block formula itself has one implementation, `scale_blocks` (numpy or jax.numpy): the
forward's `dequantize_blocks`, the numpy block-row `dequantize_rows` (HF loader, converter,
exporter) and the converter's XLA kernel all call it.

Sources: `load_hf_fp8` (a Hugging Face FP8 folder, e.g. the DeepSeek-V3 release),
`jaxmoe-convert --keep-fp8` (an Orbax checkpoint read by `load_orbax_fp8`), or
`quantize_fp8(model)` (blockwise amax/448 quantisation of a model in memory).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from jaxmoe import hf_mapping
from jaxmoe.config import ModelConfig
from jaxmoe.layers.params import weight
from jaxmoe.safetensors_io import CheckpointError

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0
BLOCK = (128, 128)
SCALE_SUFFIX = "_scale_inv"  # `<weight>_scale_inv`: the float32 block scales of an FP8 weight


class QuantValue(nnx.Variable):
    """Stored quantized data (FP8 / int8 values and their scales): not a trainable Param."""


def scale_shape(shape: tuple, block: tuple[int, int]) -> tuple[int, int]:
    return (-(-shape[-2] // block[0]), -(-shape[-1] // block[1]))


def scale_blocks(x, scale_inv, block: tuple[int, int], xp=jnp):
    """The block formula of dsv3-spec §6 on float32 values x [..., R, C]: x[..., r, c] *
    scale_inv[..., r // br, c // bc] (scale_inv [..., ceil(R/br), ceil(C/bc)]), one float32
    product per element. `xp` is numpy or jax.numpy: the one implementation behind the FP8
    forward (`dequantize_blocks`), the loaders' and converter's numpy path (`dequantize_rows`)
    and the converter's XLA kernel, so all of them give the same bits."""
    *lead, R, C = x.shape
    br, bc = block
    Rb, Cb = scale_inv.shape[-2:]
    if (Rb * br, Cb * bc) != (R, C):  # ragged edge blocks (kv_a_proj's 576 rows): pad, crop below
        x = xp.pad(x, [(0, 0)] * len(lead) + [(0, Rb * br - R), (0, Cb * bc - C)])
    y = x.reshape(*lead, Rb, br, Cb, bc) * scale_inv[..., :, None, :, None]  # [..., Rb, br, Cb, bc]
    return y.reshape(*lead, Rb * br, Cb * bc)[..., :R, :C]  # -> [..., Rb*br, Cb*bc], cropped to [..., R, C]


def dequantize_blocks(q: jax.Array, scale_inv: jax.Array, block: tuple[int, int]) -> jax.Array:
    """q [..., R, C] (e4m3), scale_inv [..., ceil(R/br), ceil(C/bc)] -> float32 [..., R, C]."""
    return scale_blocks(q.astype(jnp.float32), scale_inv.astype(jnp.float32), block)


def dequantize_rows(w: np.ndarray, scale_inv: np.ndarray, row0: int, block: tuple[int, int],
                    out_dtype, name: str) -> np.ndarray:
    """Rows [row0, row0 + len(w)) of an FP8 weight (row0 a multiple of the block rows) ->
    out_dtype, in numpy: `scale_blocks` one block-row at a time, so the temporaries are a few
    block-rows of float32, never a float32 copy of the tensor. `scale_inv` holds the scale rows
    of these rows ([ceil(rows/br), ceil(cols/bc)]; all of them when row0 == 0); row0 only
    places error messages. A non-finite product is refused naming the element, its fp8 value
    and its scale."""
    br, bc = block
    rows, cols = w.shape
    if row0 % br:
        raise ValueError(f"{name}: row offset {row0} not aligned to the {br}-row FP8 block")
    s = np.asarray(scale_inv, np.float32)
    want = scale_shape(w.shape, block)
    if s.shape != want:
        where = f"rows {row0}..{row0 + rows - 1} of " if row0 else ""
        raise CheckpointError(f"tensor {name!r}: scale {name}{SCALE_SUFFIX} has shape {s.shape}, "
                              f"expected {want} for {where}weight {tuple(w.shape)}")
    out = np.empty((rows, cols), out_dtype)
    for b0 in range(0, rows, br):
        sb = s[b0 // br][None]  # [1, ceil(cols/bc)]
        with np.errstate(invalid="ignore", over="ignore"):  # refused below, naming the element
            x = scale_blocks(np.asarray(w[b0:b0 + br], np.float32), sb, block, np)  # [<=br, cols]
        if not np.isfinite(x).all():
            r, c = (int(i) for i in np.argwhere(~np.isfinite(x))[0])
            raise CheckpointError(f"tensor {name!r}: {x[r, c]} at [{row0 + b0 + r}, {c}] after "
                                  f"FP8 dequantisation (fp8 {float(w[b0 + r, c])} x scale_inv "
                                  f"{float(sb[0, c // bc])}); expected finite values")
        out[b0:b0 + br] = x
    return out


def to_layout(w: jax.Array, transform: str, cfg: ModelConfig) -> jax.Array:
    """The `hf_mapping` transform on the last two axes of w [..., out, in] (jnp)."""
    N = cfg.num_attention_heads
    if transform == "copy":
        return w
    if transform == "T":
        return jnp.swapaxes(w, -1, -2)
    if transform == "q_heads":  # [..., N*J, X] -> [..., X, N, J] (X: the input, Q or D)
        *lead, NJ, X = w.shape
        return jnp.moveaxis(w.reshape(*lead, N, NJ // N, X), -1, -3)  # via [..., N, J, X]
    if transform == "o_heads":  # [..., D, N*G] -> [..., N, G, D]
        *lead, D, NG = w.shape
        return jnp.moveaxis(w.reshape(*lead, D, N, NG // N), -3, -1)  # via [..., D, N, G]
    raise ValueError(f"unknown transform {transform!r}")


def from_layout(w: jax.Array, transform: str, cfg: ModelConfig) -> jax.Array:
    """Inverse of `to_layout`: jaxmoe layout -> [..., out, in]."""
    if transform == "copy":
        return w
    if transform == "T":
        return jnp.swapaxes(w, -1, -2)
    if transform == "q_heads":  # [..., X, N, J] -> [..., N*J, X]
        *lead, X, N, J = w.shape
        return jnp.moveaxis(w, -3, -1).reshape(*lead, N * J, X)  # via [..., N, J, X]
    if transform == "o_heads":  # [..., N, G, D] -> [..., D, N*G]
        *lead, N, G, D = w.shape
        return jnp.moveaxis(w, -1, -3).reshape(*lead, D, N * G)  # via [..., D, N, G]
    raise ValueError(f"unknown transform {transform!r}")


class FP8Block(nnx.Module):
    """An e4m3 weight with 128x128 block scales in the checkpoint's [out, in] layout."""

    def __init__(self, q, scale_inv, transform: str, block: tuple[int, int] = BLOCK):
        self.q = QuantValue(q)                  # [..., out, in] float8_e4m3fn
        self.scale_inv = QuantValue(scale_inv)  # [..., ceil(out/br), ceil(in/bc)] float32
        self.transform = transform
        self.block = tuple(block)

    def effective_weight(self, cfg: ModelConfig) -> jax.Array:
        w = dequantize_blocks(self.q[...], self.scale_inv[...], self.block)
        return to_layout(w, self.transform, cfg).astype(cfg.dtype)


# --------------------------------------------------------------------------- model surgery
def fp8_paths(cfg: ModelConfig) -> dict[tuple, str]:
    """State path -> layout transform of every parameter stored FP8 in the V3 release."""
    return {e.path: e.transform for e in hf_mapping.entries(cfg) if e.fp8_eligible}


def get_attr(model, path: tuple):
    obj = model
    for k in path:
        obj = obj[k] if isinstance(k, int) else getattr(obj, k)
    return obj


def set_attr(model, path: tuple, value) -> None:
    setattr(get_attr(model, path[:-1]), path[-1], value)


def quantize_blocks(w: jax.Array, block: tuple[int, int] = BLOCK) -> tuple[jax.Array, jax.Array]:
    """w float [..., R, C] -> (e4m3 [..., R, C], scale_inv float32 [..., Rb, Cb]) with
    scale_inv = amax(block) / 448 (1 for an all-zero block), ragged edges zero-padded for the
    amax and cropped (the published recipe, dsv3-spec §6)."""
    *lead, R, C = w.shape
    br, bc = block
    Rb, Cb = scale_shape(w.shape, block)
    p = jnp.pad(w.astype(jnp.float32), [(0, 0)] * len(lead) + [(0, Rb * br - R), (0, Cb * bc - C)])
    blocks = p.reshape(*lead, Rb, br, Cb, bc)  # [..., Rb*br, Cb*bc] -> [..., Rb, br, Cb, bc]
    amax = jnp.abs(blocks).max(axis=(-3, -1))  # [..., Rb, Cb]
    s = jnp.where(amax > 0, amax / E4M3_MAX, 1.0).astype(jnp.float32)
    q = jnp.clip(blocks / s[..., :, None, :, None], -E4M3_MAX, E4M3_MAX)
    q = q.reshape(*lead, Rb * br, Cb * bc)[..., :R, :C].astype(E4M3)  # -> [..., Rb*br, Cb*bc] -> [..., R, C]
    return q, s


def quantize_fp8(model, block: tuple[int, int] = BLOCK):
    """Quantise every FP8-eligible linear weight of `model` (in place) to e4m3 blocks."""
    cfg = model.cfg
    for path, transform in fp8_paths(cfg).items():
        var = get_attr(model, path)
        if isinstance(var, FP8Block):
            continue
        w = from_layout(var[...].astype(jnp.float32), transform, cfg)
        q, s = _quantize_blocks_jit(w, tuple(block))
        set_attr(model, path, FP8Block(q, s, transform, block))
    return model


def dequantize_model(model):
    """Replace every FP8Block by a plain parameter holding its effective weight (in place)."""
    cfg = model.cfg
    for path in fp8_paths(cfg):
        var = get_attr(model, path)
        if isinstance(var, FP8Block):
            set_attr(model, path, nnx.Param(weight(var, cfg).astype(cfg.param_dtype)))
    return model


# ------------------------------------------------------------------------------- loading
def load_hf_fp8(path, dtype: str = "float32", mtp="auto", **overrides):
    """A Hugging Face checkpoint folder as a DeepseekV3 that keeps its FP8 tensors (and their
    `weight_scale_inv`) as `FP8Block`s; every other tensor is loaded in `dtype` as usual."""
    from jaxmoe.hf_io import (HFCheckpoint, abstract_model, check_unexpected, model_config_for,
                              state_from_hf)

    ckpt = HFCheckpoint(path)
    cfg = model_config_for(ckpt, dtype, mtp, **overrides)
    if ckpt.fp8_block[0] <= 0 or ckpt.fp8_block[1] <= 0:
        raise CheckpointError(f"{ckpt.config_path}: bad weight_block_size {ckpt.fp8_block}")
    block = tuple(ckpt.fp8_block)
    model = abstract_model(cfg)
    flat_abstract = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}
    check_unexpected(ckpt, cfg)
    entries = list(hf_mapping.entries(cfg))
    fp8 = {}  # path -> [entries]
    for e in entries:
        if ckpt.raw(e.hf_name).dtype == ml_dtypes.float8_e4m3fn:
            fp8.setdefault(e.path, []).append(e)
    for p, es in fp8.items():
        everyone = [e for e in entries if e.path == p]
        if len(es) != len(everyone):
            plain = next(e.hf_name for e in everyone if e not in es)
            raise CheckpointError(f"{ckpt.path}: {es[0].hf_name!r} is FP8 but {plain!r} (same "
                                  "parameter) is not; mixed storage is not supported")
    shapes = {p: tuple(v.shape) for p, v in flat_abstract.items() if p not in fp8}
    buffers = dict(state_from_hf(cfg, ckpt.get, shapes, [e for e in entries if e.path not in fp8]))
    for p, es in fp8.items():
        want = tuple(flat_abstract[p].shape)
        lead = want[:len(es[0].index)]
        expect = _hf_shape(want[len(lead):], es[0].transform)
        q = np.zeros(lead + expect, ml_dtypes.float8_e4m3fn)
        s = np.zeros(lead + scale_shape(expect, block), np.float32)
        for e in es:
            raw = ckpt.raw(e.hf_name)
            sname = e.hf_name + SCALE_SUFFIX
            sc = np.asarray(ckpt.scale_of(e.hf_name), np.float32)
            if tuple(raw.shape) != expect:
                raise CheckpointError(f"tensor {e.hf_name!r}: shape {tuple(raw.shape)}, expected "
                                      f"{expect} for parameter {'/'.join(map(str, p))} {want}")
            if sc.shape != scale_shape(raw.shape, block):
                raise CheckpointError(f"tensor {sname!r}: shape {sc.shape}, expected "
                                      f"{scale_shape(raw.shape, block)} for weight {raw.shape}")
            if not np.isfinite(sc).all():
                raise CheckpointError(f"tensor {sname!r}: non-finite scales")
            if ((np.asarray(raw).view(np.uint8) & 0x7F) == 0x7F).any():  # e4m3fn NaN: s.1111.111
                raise CheckpointError(f"tensor {e.hf_name!r}: FP8 NaN codes in the weight")
            q[e.index] = raw
            s[e.index] = sc
        buffers[p] = (q, s, es[0].transform)
    return _assemble(model, cfg, buffers, block)


def _hf_shape(shape: tuple, transform: str) -> tuple:
    """Published [out, in] shape of one slab of jaxmoe shape `shape`."""
    if transform == "copy":
        return tuple(shape)
    if transform == "T":
        return tuple(reversed(shape))
    if transform == "q_heads":
        return (shape[1] * shape[2], shape[0])
    if transform == "o_heads":
        return (shape[2], shape[0] * shape[1])
    raise ValueError(transform)


def _assemble(model, cfg: ModelConfig, buffers: dict, block):
    """Fill the abstract model: plain arrays by path; (q, scale, transform) become FP8Blocks."""
    for p, b in buffers.items():
        if isinstance(b, tuple):
            q, s, transform = b
            set_attr(model, p, FP8Block(jax.ShapeDtypeStruct(q.shape, E4M3),
                                        jax.ShapeDtypeStruct(s.shape, jnp.float32),
                                        transform, block))
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    for p, v in flat:
        if p in buffers:
            v.set_value(jnp.asarray(buffers[p], dtype=v.get_value().dtype))
        elif p[:-1] in buffers and isinstance(buffers[p[:-1]], tuple):
            q, s, _ = buffers[p[:-1]]
            v.set_value(jnp.asarray(q if p[-1] == "q" else s))
        else:
            raise CheckpointError(f"no checkpoint tensor fills parameter {'/'.join(map(str, p))}")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def fp8_layout(model) -> dict:
    """{param name: {"transform", "block"}} of the FP8Blocks of `model` (for checkpoint metadata)."""
    from jaxmoe.orbax_io import param_name

    out = {}
    for path in fp8_paths(model.cfg):
        var = get_attr(model, path)
        if isinstance(var, FP8Block):
            out[param_name(path)] = {"transform": var.transform, "block": list(var.block)}
    return out


def load_orbax_fp8(path, dtype: str | None = "float32", sharding=None, mtp="auto", **overrides):
    """A checkpoint written by `jaxmoe-convert --keep-fp8` (its jaxmoe.json lists the FP8
    parameters under "fp8"), with the FP8Blocks restored as stored."""
    from jaxmoe import orbax_io
    from jaxmoe.hf_io import abstract_model

    meta = orbax_io.read_marker(path)
    layout = meta.get("fp8")
    if not layout:
        raise CheckpointError(f"{path}: not an FP8 checkpoint (no 'fp8' in {orbax_io.MARKER})")
    cfg = orbax_io.config_of(meta, dtype).replace(**overrides)
    names = set(orbax_io.stored_names(path))
    n = cfg.num_nextn_predict_layers
    has_mtp = n > 0 and orbax_io.param_name(("mtp", 0, "eh_proj_UD")) in names
    if mtp is True and not has_mtp:
        raise CheckpointError(f"{path}: MTP requested but the checkpoint has no MTP module")
    cfg = cfg.replace(num_nextn_predict_layers=n if (mtp and has_mtp) else 0)
    model = abstract_model(cfg)
    for p, transform in fp8_paths(cfg).items():
        name = orbax_io.param_name(p)
        if name not in layout:
            continue
        q = orbax_io.open_array(path, name + ".q")
        s = orbax_io.open_array(path, name + ".scale_inv")
        set_attr(model, p, FP8Block(jax.ShapeDtypeStruct(tuple(q.shape), E4M3),
                                    jax.ShapeDtypeStruct(tuple(s.shape), jnp.float32),
                                    layout[name]["transform"], tuple(layout[name]["block"])))
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, orbax_io.restore_state(os.fspath(path), state, sharding, names))


_quantize_blocks_jit = jax.jit(quantize_blocks, static_argnums=1)  # one wrapper: compiled once per shape
