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
FP8_DTYPE = "F8_E4M3"


class QuantValue(nnx.Variable):
    """Stored quantized data (FP8 / int8 values and their scales): not a trainable Param."""


def scale_shape(shape: tuple, block: tuple[int, int]) -> tuple[int, int]:
    return (-(-shape[-2] // block[0]), -(-shape[-1] // block[1]))


def dequantize_blocks(q: jax.Array, scale_inv: jax.Array, block: tuple[int, int]) -> jax.Array:
    """q [..., R, C] (e4m3), scale_inv [..., ceil(R/br), ceil(C/bc)] -> float32 [..., R, C]."""
    *lead, R, C = q.shape
    br, bc = block
    Rb, Cb = scale_inv.shape[-2:]
    x = q.astype(jnp.float32)
    s = scale_inv.astype(jnp.float32)
    if R == Rb * br and C == Cb * bc:
        x = x.reshape(*lead, Rb, br, Cb, bc) * s[..., :, None, :, None]  # [..., Rb, br, Cb, bc]
        return x.reshape(*lead, R, C)
    # ragged edge blocks (e.g. kv_a_proj_with_mqa's 576 rows): expand the scales and crop
    s = jnp.repeat(jnp.repeat(s, br, axis=-2)[..., :R, :], bc, axis=-1)[..., :C]  # [..., R, C]
    return x * s


def to_layout(w: jax.Array, transform: str, cfg: ModelConfig) -> jax.Array:
    """The `hf_mapping` transform on the last two axes of w [..., out, in] (jnp)."""
    N = cfg.num_attention_heads
    if transform == "copy":
        return w
    if transform == "T":
        return jnp.swapaxes(w, -1, -2)
    if transform == "q_heads":  # [..., N*J, A] -> [..., A, N, J]
        *lead, NJ, A = w.shape
        return jnp.moveaxis(w.reshape(*lead, N, NJ // N, A), -1, -3)
    if transform == "o_heads":  # [..., D, N*G] -> [..., N, G, D]
        *lead, D, NG = w.shape
        return jnp.moveaxis(w.reshape(*lead, D, N, NG // N), -3, -1)
    raise ValueError(f"unknown transform {transform!r}")


def from_layout(w: jax.Array, transform: str, cfg: ModelConfig) -> jax.Array:
    """Inverse of `to_layout`: jaxmoe layout -> [..., out, in]."""
    if transform == "copy":
        return w
    if transform == "T":
        return jnp.swapaxes(w, -1, -2)
    if transform == "q_heads":  # [..., A, N, J] -> [..., N*J, A]
        *lead, A, N, J = w.shape
        return jnp.moveaxis(w, -3, -1).reshape(*lead, N * J, A)
    if transform == "o_heads":  # [..., N, G, D] -> [..., D, N*G]
        *lead, N, G, D = w.shape
        return jnp.moveaxis(w, -1, -3).reshape(*lead, D, N * G)
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
    blocks = p.reshape(*lead, Rb, br, Cb, bc)
    amax = jnp.abs(blocks).max(axis=(-3, -1))  # [..., Rb, Cb]
    s = jnp.where(amax > 0, amax / E4M3_MAX, 1.0).astype(jnp.float32)
    q = jnp.clip(blocks / s[..., :, None, :, None], -E4M3_MAX, E4M3_MAX)
    q = q.reshape(*lead, Rb * br, Cb * bc)[..., :R, :C].astype(E4M3)
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
    from jaxmoe.hf_io import HFCheckpoint, SCALE_SUFFIX, abstract_model, model_config_for

    ckpt = HFCheckpoint(path)
    cfg = model_config_for(ckpt, dtype, mtp, **overrides)
    if ckpt.fp8_block[0] <= 0 or ckpt.fp8_block[1] <= 0:
        raise CheckpointError(f"{ckpt.config_path}: bad weight_block_size {ckpt.fp8_block}")
    block = tuple(ckpt.fp8_block)
    model = abstract_model(cfg)
    flat_abstract = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}

    def dtype_of(name):
        f = ckpt.file(ckpt.weight_map[name]) if name in ckpt else None
        if f is None:
            raise CheckpointError(f"{ckpt.path}: tensor {name!r} missing from the checkpoint")
        if name not in f.header:
            raise CheckpointError(f"{f.path}: tensor {name!r} listed in the index is not in "
                                  "the file")
        return f.header[name]["dtype"]

    entries = list(hf_mapping.entries(cfg))
    expected = {e.hf_name for e in entries}
    mtp_prefix = f"model.layers.{cfg.num_hidden_layers}."
    extra = [n for n in ckpt.names() if n not in expected and not n.endswith(SCALE_SUFFIX)
             and not (n.startswith(mtp_prefix) and cfg.num_nextn_predict_layers == 0)
             and ckpt.raw(n).size > 0]  # (transformers' zero-width shared experts)
    if extra:
        raise CheckpointError(f"{ckpt.path}: unexpected tensor(s) not in the model: "
                              f"{sorted(extra)[:8]}{' ...' if len(extra) > 8 else ''}")
    fp8 = {}  # path -> [entries]
    for e in entries:
        if dtype_of(e.hf_name) == FP8_DTYPE:
            fp8.setdefault(e.path, []).append(e)
    for p, es in fp8.items():
        everyone = [e for e in entries if e.path == p]
        if len(es) != len(everyone):
            plain = next(e.hf_name for e in everyone if e not in es)
            raise CheckpointError(f"{ckpt.path}: {es[0].hf_name!r} is FP8 but {plain!r} (same "
                                  "parameter) is not; mixed storage is not supported")
    buffers: dict[tuple, np.ndarray] = {}
    for e in entries:
        if e.path in fp8:
            continue
        shape = tuple(flat_abstract[e.path].shape)
        a = e.to_jaxmoe(np.asarray(ckpt.get(e.hf_name), np.float32), cfg)
        if a.shape != shape[len(e.index):]:
            raise CheckpointError(f"tensor {e.hf_name!r}: shape {a.shape} does not fit "
                                  f"parameter {'/'.join(map(str, e.path))} {shape}")
        if e.index:
            buffers.setdefault(e.path, np.zeros(shape, np.float32))[e.index] = a
        else:
            buffers[e.path] = a
    for p, es in fp8.items():
        want = tuple(flat_abstract[p].shape)
        lead = want[:len(es[0].index)]
        expect = _hf_shape(want[len(lead):], es[0].transform)
        q = np.zeros(lead + expect, ml_dtypes.float8_e4m3fn)
        s = np.zeros(lead + scale_shape(expect, block), np.float32)
        for e in es:
            raw = ckpt.raw(e.hf_name)
            sname = e.hf_name + SCALE_SUFFIX
            if sname not in ckpt:
                raise CheckpointError(f"{ckpt.path}: FP8 tensor {e.hf_name!r} has no scale "
                                      f"{sname!r}")
            sc = np.asarray(ckpt.raw(sname), np.float32)
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
