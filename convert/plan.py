"""What to write: one `ArrayPlan` per jaxmoe parameter and one `Slab` per unit of work.

Built from `jaxmoe.hf_mapping.entries(cfg)` and the abstract model (shapes, dtypes). A slab is
one published tensor (a layer of a stacked parameter, one expert of a layer, or a whole
array), split further into row blocks when it is larger than `max_slab_bytes` (only for the
plain `copy` / `T` transforms: embeddings, LM heads, dense MLPs). Each array's zarr chunk is
exactly one slab, so every write is chunk-aligned and nothing is read back.

`validate` checks the source against the plan before anything is written; every problem names
the tensor (and file) with the expected and the found value.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import numpy as np
from flax import nnx

from jaxmoe import hf_mapping
from jaxmoe.config import ModelConfig
from jaxmoe.hf_io import SCALE_SUFFIX, abstract_model, model_config_for
from jaxmoe.orbax_io import param_name
from jaxmoe.safetensors_io import CheckpointError

from convert.fp8 import scale_shape
from convert.source import FLOAT_DTYPES, FP8_DTYPE, Source

DEFAULT_MAX_SLAB = 256 << 20


def hf_shape(transform: str, shape: tuple, cfg: ModelConfig) -> tuple:
    """The published [out, in] shape of one slab of jaxmoe shape `shape` (inverse of the
    `hf_mapping` transforms, on shapes only)."""
    if transform == "copy":
        return tuple(shape)
    if transform == "T":
        return tuple(reversed(shape))
    if transform == "q_heads":  # [A, N, J] -> [N*J, A]
        return (shape[1] * shape[2], shape[0])
    if transform == "o_heads":  # [N, G, D] -> [D, N*G]
        return (shape[2], shape[0] * shape[1])
    raise ValueError(f"unknown transform {transform!r}")


@dataclasses.dataclass(frozen=True)
class ArrayPlan:
    path: tuple
    name: str          # orbax parameter name ("moe_layers.ffn.w_gate_EDF")
    shape: tuple
    dtype: str
    chunks: tuple
    split_rows: int    # HF rows per slab (== all rows when unsplit)


@dataclasses.dataclass(frozen=True)
class Slab:
    key: str           # journal id: hf name, plus "@r0:r1" for a row block
    entry: hf_mapping.Entry
    array: str
    rows: tuple | None  # HF rows [r0, r1) when split
    hf_shape: tuple     # shape of the HF tensor (whole)
    out_index: tuple    # tensorstore index (ints and slices) of this slab in the array
    scale: str | None   # FP8 scale tensor name
    src_bytes: int
    out_bytes: int
    kind: str = "value"  # "value"; with keep_fp8: "fp8" (raw e4m3 weight), "fp8_scale"

    @property
    def row0(self) -> int:
        """The first HF row this slab holds."""
        return self.rows[0] if self.rows else 0


@dataclasses.dataclass
class Plan:
    cfg: ModelConfig
    dtype: str
    arrays: dict        # name -> ArrayPlan
    slabs: list
    fingerprint: str
    drop_mtp: bool = False  # layer num_hidden_layers (MTP) deliberately left out
    fp8: dict = dataclasses.field(default_factory=dict)  # keep_fp8: name -> transform, block

    @property
    def total_out_bytes(self) -> int:
        return sum(s.out_bytes for s in self.slabs)

    @property
    def num_params(self) -> int:
        return sum(math.prod(a.shape) for a in self.arrays.values())

    @property
    def max_slab_bytes(self) -> int:
        return max((s.out_bytes for s in self.slabs), default=0)


def model_config(src: Source, mtp) -> ModelConfig:
    mtp = {"yes": True, "no": False}.get(mtp, mtp)
    return model_config_for(src.ckpt, "float32", mtp)  # (config.json problems: CheckpointError)


def _split_rows(e: hf_mapping.Entry, slab_shape: tuple, itemsize: int, max_bytes: int,
                block_rows: int) -> int:
    """HF rows per slab for a plain 2-D tensor over `max_bytes` (FP8-block aligned), else -1."""
    hs = hf_shape(e.transform, slab_shape, None) if e.transform in ("copy", "T") else None
    if hs is None or len(hs) != 2 or hs[0] * hs[1] * itemsize <= max_bytes:
        return -1
    rows = max(1, max_bytes // (hs[1] * itemsize))
    return max(block_rows, rows // block_rows * block_rows)


def build_plan(src: Source, dtype: str | None = None, mtp="auto",
               max_slab_bytes: int = DEFAULT_MAX_SLAB, keep_fp8: bool = False) -> Plan:
    """keep_fp8: FP8 weights are stored as they are (`<param>.q` e4m3 in the published [out, in]
    layout, `<param>.scale_inv` float32 blocks) for `jaxmoe.quant` FP8-weight inference."""
    cfg = model_config(src, mtp)
    ents = list(hf_mapping.entries(cfg))
    dtype = dtype or src.source_dtype(e.hf_name for e in ents)
    cfg = cfg.replace(param_dtype=dtype, dtype=dtype)
    flat = nnx.to_flat_state(nnx.state(abstract_model(cfg)))
    abstract = {p: v.get_value() for p, v in flat}
    arrays: dict[str, ArrayPlan] = {}
    slabs: list[Slab] = []
    kept = _kept_fp8(src, ents) if keep_fp8 else set()
    fp8_layout: dict[str, dict] = {}
    for e in ents:
        if e.path in kept:
            slabs += _fp8_slabs(src, e, abstract[e.path], arrays, fp8_layout)
            continue
        if e.path not in abstract:
            raise CheckpointError(f"mapping row {e.hf_name} -> {param_name(e.path)} has no "
                                  "model parameter")
        a = abstract[e.path]
        name = param_name(e.path)
        slab_shape = tuple(a.shape[len(e.index):])
        dt = np.dtype(a.dtype).name
        itemsize = np.dtype(a.dtype).itemsize
        if name not in arrays:
            split = _split_rows(e, slab_shape, itemsize, max_slab_bytes,
                                (src.fp8_block or (128, 128))[0])
            chunk = list(slab_shape)
            if split > 0:
                chunk[0 if e.transform == "copy" else -1] = split
            arrays[name] = ArrayPlan(e.path, name, tuple(a.shape), dt,
                                     (1,) * len(e.index) + tuple(chunk), split)
        ap = arrays[name]
        hs = hf_shape(e.transform, slab_shape, cfg)
        present = e.hf_name in src
        fp8 = present and src.dtype_name(e.hf_name) == FP8_DTYPE
        row_bytes = src.nbytes(e.hf_name) // max(hs[0], 1) if present else 0
        blocks = [(0, hs[0])] if ap.split_rows <= 0 else \
            [(r, min(r + ap.split_rows, hs[0])) for r in range(0, hs[0], ap.split_rows)]
        for r0, r1 in blocks:
            rows = None if ap.split_rows <= 0 else (r0, r1)
            tail: tuple = ()
            if rows is not None:
                tail = ((slice(r0, r1), slice(None)) if e.transform == "copy"
                        else (slice(None), slice(r0, r1)))
            src_bytes = row_bytes * (r1 - r0)  # whole rows: the blocks add up exactly
            n = (r1 - r0) * math.prod(hs[1:])
            slabs.append(Slab(
                e.hf_name + ("" if rows is None else f"@{r0}:{r1}"), e, name, rows, hs,
                tuple(e.index) + tail, e.hf_name + SCALE_SUFFIX if fp8 else None,
                src_bytes, n * itemsize))

    def tensor(s: Slab) -> str:
        return s.scale if s.kind == "fp8_scale" else s.entry.hf_name

    slabs.sort(key=lambda s: (src.sort_key(tensor(s)) if tensor(s) in src
                              else ("~", 0)) + (s.rows or (0, 0),))
    fp = hashlib.sha256(json.dumps(
        [src.fingerprint(), cfg.to_hf_config(), dtype,
         [[a.name, a.shape, a.dtype, a.chunks] for a in arrays.values()],
         [s.key for s in slabs]], default=str).encode()).hexdigest()
    return Plan(cfg, dtype, arrays, slabs, fp, drop_mtp=mtp in (False, "no"), fp8=fp8_layout)


def _kept_fp8(src: Source, ents) -> set:
    """Parameters whose every published tensor is FP8 in the source (kept as FP8)."""
    by_path: dict[tuple, list] = {}
    for e in ents:
        if e.hf_name in src:
            by_path.setdefault(e.path, []).append(src.dtype_name(e.hf_name) == FP8_DTYPE)
    mixed = [p for p, f in by_path.items() if any(f) and not all(f)]
    if mixed:
        raise CheckpointError(f"{src.path}: --keep-fp8: parameter {param_name(mixed[0])} has "
                              "both FP8 and non-FP8 tensors in the source")
    return {p for p, f in by_path.items() if all(f)}


def _fp8_slabs(src: Source, e: hf_mapping.Entry, a, arrays: dict, layout: dict) -> list:
    """The e4m3 weight and its scale blocks of one FP8 tensor, stored as published."""
    name = param_name(e.path)
    lead = tuple(a.shape[:len(e.index)])
    hs = hf_shape(e.transform, tuple(a.shape[len(e.index):]), None)
    ss = scale_shape(hs, src.fp8_block)
    for suffix, shape, dt in ((".q", hs, "float8_e4m3fn"), (".scale_inv", ss, "float32")):
        if name + suffix not in arrays:
            arrays[name + suffix] = ArrayPlan(e.path + (suffix[1:],), name + suffix, lead + shape,
                                              dt, (1,) * len(lead) + shape, -1)
    layout[name] = {"transform": e.transform, "block": list(src.fp8_block)}
    sname = e.hf_name + SCALE_SUFFIX
    n, m = math.prod(hs), math.prod(ss)
    return [Slab(e.hf_name, e, name + ".q", None, hs, tuple(e.index), sname,
                 src.nbytes(e.hf_name), n, kind="fp8"),
            Slab(sname, e, name + ".scale_inv", None, hs, tuple(e.index), sname,
                 src.nbytes(sname) if sname in src else 0, 4 * m, kind="fp8_scale")]


# ------------------------------------------------------------------------------- validation
def validate(src: Source, plan: Plan) -> None:
    """Raise one CheckpointError listing every problem of the source against the plan."""
    cfg, problems = plan.cfg, []
    expected: set[str] = set()
    for e in {s.entry.hf_name: s.entry for s in plan.slabs}.values():
        expected.add(e.hf_name)
        a = plan.arrays.get(param_name(e.path)) or plan.arrays[param_name(e.path) + ".q"]
        want = hf_shape(e.transform, a.shape[len(e.index):], cfg) if a.name == param_name(
            e.path) else tuple(a.shape[len(e.index):])
        if e.hf_name not in src:
            problems.append(f"tensor {e.hf_name!r} missing from the checkpoint (config.json "
                            f"implies it, shape {list(want)})")
            continue
        try:
            info = src.info(e.hf_name)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        where = f"tensor {e.hf_name!r} in {src.file_of(e.hf_name)}"
        if tuple(info["shape"]) != want:
            problems.append(f"{where}: shape {info['shape']}, expected {list(want)} from "
                            f"config.json (parameter {a.name} {list(a.shape)})")
        dt = info["dtype"]
        if dt == FP8_DTYPE:
            if src.fp8_block is None:
                problems.append(f"{where}: dtype {dt} but config.json has no "
                                "quantization_config (expected F32/BF16/F16)")
                continue
            expected.add(e.hf_name + SCALE_SUFFIX)
            problems += _check_scale(src, e.hf_name, tuple(info["shape"]))
        elif dt not in FLOAT_DTYPES:
            problems.append(f"{where}: dtype {dt}, expected one of "
                            f"{list(FLOAT_DTYPES) + [FP8_DTYPE]}")
    drop_mtp = f"model.layers.{cfg.num_hidden_layers}."
    extra = []
    for n in src.names():
        base = n[:-len(SCALE_SUFFIX)] if n.endswith(SCALE_SUFFIX) else None
        if n in expected or (base in expected and base not in src):
            continue  # (a scale whose weight is missing: that weight is already reported)
        if plan.drop_mtp and n.startswith(drop_mtp):
            continue
        try:
            if src.info(n)["shape"] and 0 in src.info(n)["shape"]:
                continue  # transformers' zero-width shared experts (n_shared_experts == 0)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        extra.append(n)
    if extra:
        hint = ""
        if any(n.startswith(drop_mtp) for n in extra):
            hint = (f" (config.json has num_nextn_predict_layers="
                    f"{src.config.get('num_nextn_predict_layers')}; pass --mtp no to drop "
                    "the MTP layer)")
        problems.append(f"unexpected tensor(s) not in the model ({len(extra)}): "
                        f"{sorted(extra)[:6]}{' ...' if len(extra) > 6 else ''}{hint}")
    if problems:
        more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise CheckpointError(f"{src.path}: {len(problems)} problem(s):\n  " +
                              "\n  ".join(problems[:12]) + more)


def _check_scale(src: Source, name: str, shape: tuple) -> list[str]:
    sname = name + SCALE_SUFFIX
    if sname not in src:
        return [f"FP8 tensor {name!r}: scale tensor {sname!r} missing"]
    try:
        info = src.info(sname)
    except CheckpointError as err:
        return [str(err)]
    want = scale_shape(shape, src.fp8_block)
    out = []
    if tuple(info["shape"]) != want:
        out.append(f"scale {sname!r} in {src.file_of(sname)}: shape {info['shape']}, expected "
                   f"{list(want)} for weight {list(shape)} with {list(src.fp8_block)} blocks")
    if info["dtype"] not in ("F32", "BF16"):
        out.append(f"scale {sname!r} in {src.file_of(sname)}: dtype {info['dtype']}, "
                   "expected F32")
    return out
