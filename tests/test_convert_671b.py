"""The converter's planning and validation on the real 671B release layout, without its 641 GiB.

`synth.write_sparse_checkpoint` writes the published inventory (91,991 tensors, dsv3-spec §7) as
163 shards with real safetensors headers and the published config.json (§1.3, with
quantization_config, §6), every data region a hole: a few MB on disk, zeros when read. The plan
and validation run exactly as `pipeline.convert` runs them; a few real-size slabs then go
through `pipeline.compute_slab` with data planted into the holes (dequantisation, the
NaN/Inf refusal, row blocks).
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import shutil
import struct
import time
from collections import defaultdict

import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import jaxmoe
from convert import cli, pipeline, synth
from convert.plan import DEFAULT_MAX_SLAB, build_plan, validate
from convert.source import Source
from jaxmoe.orbax_io import param_name
from jaxmoe.safetensors_io import CheckpointError
from test_config import V3_CONFIG_JSON  # the published config.json, field for field

TENSORS, TENSOR_BYTES = 91_991, 688_574_839_360  # dsv3-spec §7
PARAMS, MAIN_PARAMS = 684_489_845_504, 671_026_419_200  # §7: all, without layer 61
ROUTER = 256 * 7168 + 256  # router weight + bias per MoE layer: float32 in jaxmoe (dtype policy)
MTP = "model.layers.61."
BF16 = np.dtype(ml_dtypes.bfloat16)


def _disk_bytes(folder) -> int:
    """Allocated bytes (what `du` counts), not the apparent size."""
    return sum(os.stat(os.path.join(folder, f)).st_blocks * 512 for f in os.listdir(folder))


@pytest.fixture(scope="module")
def sparse_671b(tmp_path_factory):
    path = synth.write_sparse_checkpoint(tmp_path_factory.mktemp("v3") / "hf",
                                         jaxmoe.deepseek_v3_671b(), V3_CONFIG_JSON)
    yield path
    shutil.rmtree(path)  # 642 GB apparent: not left for pytest's tmp retention


@pytest.fixture(scope="module")
def planned(sparse_671b):
    """Source, plan and validation as `pipeline.convert` does them, timed. The growth of the
    process's peak RSS bounds their memory (0 when an earlier test peaked higher)."""
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    src = Source(sparse_671b)
    t1 = time.perf_counter()
    plan = build_plan(src, None, "auto", DEFAULT_MAX_SLAB)
    t2 = time.perf_counter()
    validate(src, plan)
    t3 = time.perf_counter()
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) << 10  # KiB on Linux
    print(f"\n671B: headers {t1 - t0:.2f} s, plan {t2 - t1:.2f} s, validate {t3 - t2:.2f} s; "
          f"peak RSS growth {peak / 2**20:.0f} MiB; {len(plan.slabs)} slabs, "
          f"{plan.total_out_bytes / 1e9:.1f} GB out, "
          f"max slab {plan.max_slab_bytes / 2**20:.1f} MiB, "
          f"disk {_disk_bytes(sparse_671b) / 2**20:.1f} MiB")
    return src, plan, peak


def _abstract(cfg) -> dict:
    """{orbax name: (shape, dtype)} of jaxmoe.DeepseekV3 built abstractly from `cfg`."""
    model = nnx.eval_shape(lambda: jaxmoe.DeepseekV3(cfg, rngs=nnx.Rngs(0)))
    return {param_name(p): (tuple(v.get_value().shape), np.dtype(v.get_value().dtype).name)
            for p, v in nnx.to_flat_state(nnx.state(model))}


def _check_tiling(plan) -> None:
    """Every array is exactly covered by its slabs: each layer / expert index once, as one whole
    slab or as row blocks chaining from 0 to the full extent; out_bytes match the regions."""
    parts = defaultdict(list)  # (array, leading index) -> row blocks (dim, r0, r1) or [None]
    for s in plan.slabs:
        a = plan.arrays[s.array]
        lead = tuple(i for i in s.out_index if isinstance(i, int))
        region, block = list(a.shape[len(lead):]), None
        for d, i in enumerate(s.out_index[len(lead):]):
            if i != slice(None):
                block, region[d] = (d, i.start, i.stop), i.stop - i.start
        assert math.prod(region) * np.dtype(a.dtype).itemsize == s.out_bytes, s.key
        parts[(s.array, lead)].append(block)
    for name, a in plan.arrays.items():
        leads = [lead for arr, lead in parts if arr == name]
        assert len(leads) == math.prod(a.shape[:len(leads[0])]), name
        for lead in leads:
            blocks = sorted(parts[(name, lead)], key=lambda b: (b is not None, b))
            if blocks == [None]:
                continue
            assert None not in blocks and len({d for d, _, _ in blocks}) == 1, (name, lead)
            extent = a.shape[len(lead) + blocks[0][0]]
            assert blocks[0][1] == 0 and blocks[-1][2] == extent, (name, lead)
            assert all(p[2] == q[1] for p, q in zip(blocks, blocks[1:])), (name, lead)


def test_sparse_671b_is_the_release_layout(sparse_671b):
    files = sorted(f for f in os.listdir(sparse_671b) if f.endswith(".safetensors"))
    assert files[0] == "model-00001-of-000163.safetensors" and len(files) == 163
    assert files[-1] == "model-00163-of-000163.safetensors"
    with open(os.path.join(sparse_671b, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert len(index["weight_map"]) == TENSORS
    assert index["metadata"]["total_size"] == TENSOR_BYTES
    last = [n for n, f in index["weight_map"].items() if f == files[-1]]
    assert last and all(n.startswith(MTP) for n in last)  # like the release's last shard
    apparent = sum(os.path.getsize(os.path.join(sparse_671b, f)) for f in files)
    assert apparent > TENSOR_BYTES  # data + headers, all of it addressable
    assert _disk_bytes(sparse_671b) < 50 << 20  # holes: headers only


def test_671b_plan_covers_every_tensor_with_the_model_shapes(planned):
    src, plan, peak = planned
    # the published config.json gives the preset (bar the training-only initializer_range)
    assert plan.cfg == jaxmoe.deepseek_v3_671b(param_dtype="bfloat16", dtype="bfloat16",
                                               initializer_range=0.02)
    covered = {s.entry.hf_name for s in plan.slabs} | {s.scale for s in plan.slabs if s.scale}
    assert covered == set(src.names()) and len(covered) == TENSORS
    assert any(s.array.startswith("mtp.") for s in plan.slabs) and not plan.drop_mtp
    assert sum(1 for s in plan.slabs if s.scale) == 45_808  # every FP8 weight with its scale
    got = {a.name: (a.shape, a.dtype) for a in plan.arrays.values()}
    assert got == _abstract(plan.cfg)
    assert plan.num_params == PARAMS
    assert plan.total_out_bytes == 2 * PARAMS + 2 * 59 * ROUTER  # bf16, float32 router
    assert plan.max_slab_bytes <= DEFAULT_MAX_SLAB
    # the row blocks' source shares add up exactly (the summary's "read" figure): weights only,
    # scales are read with their weight
    weights = {s.entry.hf_name for s in plan.slabs}
    assert sum(s.src_bytes for s in plan.slabs) == sum(src.nbytes(n) for n in weights)
    assert {a.name for a in plan.arrays.values() if a.split_rows > 0} == {
        "embed_VD", "lm_head_DV", "mtp.0.embed_VD", "mtp.0.head_DV"}
    _check_tiling(plan)
    order = [src.sort_key(s.entry.hf_name) + (s.rows or (0, 0),) for s in plan.slabs]
    assert order == sorted(order)  # sequential reads, shard after shard
    assert peak < 2 << 30  # headers and plan only: no tensor data is read


def _linked(src_dir, dst, config: dict) -> str:
    """The same shards (symlinks) under another config.json."""
    os.makedirs(dst)
    for f in os.listdir(src_dir):
        if f != "config.json":
            os.symlink(os.path.join(src_dir, f), os.path.join(dst, f))
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return os.fspath(dst)


def test_671b_mtp_layer_is_dropped_only_when_asked(sparse_671b, tmp_path, capsys):
    src = Source(sparse_671b)
    plan = build_plan(src, None, "no")
    validate(src, plan)
    assert plan.drop_mtp and plan.cfg.num_nextn_predict_layers == 0
    covered = {s.entry.hf_name for s in plan.slabs} | {s.scale for s in plan.slabs if s.scale}
    assert covered == {n for n in src.names() if not n.startswith(MTP)}
    got = {a.name: (a.shape, a.dtype) for a in plan.arrays.values()}
    assert got == _abstract(plan.cfg) and not any(n.startswith("mtp.") for n in got)
    assert plan.total_out_bytes == 2 * MAIN_PARAMS + 2 * 58 * ROUTER

    # Through the CLI: an output folder it refuses after validation, so nothing is written and
    # reaching that refusal means the plan validated.
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("not a checkpoint")
    refused = f"{out}: holds files that are not a jaxmoe/Orbax checkpoint"
    assert cli.main([sparse_671b, str(out)]) == 2
    assert refused in capsys.readouterr().err
    # config.json without the MTP layer while its tensors are there: refused unless --mtp no
    no_mtp = _linked(sparse_671b, tmp_path / "hf", {**V3_CONFIG_JSON,
                                                   "num_nextn_predict_layers": 0})
    assert cli.main([no_mtp, str(out)]) == 2
    err = capsys.readouterr().err
    assert "unexpected tensor(s) not in the model (1564)" in err and "pass --mtp no" in err
    assert refused not in err
    assert cli.main([no_mtp, str(out), "--mtp", "no"]) == 2
    assert refused in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["hf", "out"]  # no out.partial


def _poke(src: Source, name: str, data: np.ndarray, offset: int = 0) -> None:
    """Write `data`'s bytes into tensor `name` at byte `offset` of its data (fills a hole)."""
    path = os.path.join(src.path, src.file_of(name))
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + n + src.info(name)["data_offsets"][0] + offset)
        f.write(np.ascontiguousarray(data).tobytes())


def _slab(plan, key):
    return next(s for s in plan.slabs if s.key == key)


def _fp8(rng, shape) -> np.ndarray:
    u = rng.integers(0, 256, size=shape, dtype=np.uint8)
    u[(u & 0x7F) == 0x7F] ^= 1  # no NaN codes
    return u.view(ml_dtypes.float8_e4m3fn)


def test_671b_slabs_convert_from_the_sparse_source(planned):
    src, plan, _ = planned
    rng = np.random.default_rng(0)
    # holes: a zero FP8 weight with zero scales goes through the checks and dequantises to 0
    s = _slab(plan, "model.layers.3.mlp.experts.0.gate_proj.weight")
    out = pipeline.compute_slab(src, plan, s)
    assert out.shape == plan.arrays[s.array].shape[2:] == (7168, 2048)
    assert out.dtype == BF16 and not out.any()

    # MTP kv_a_proj (ragged 576 rows, shard 160 of 163): planted rows 384..575, every scale
    name = MTP + "self_attn.kv_a_proj_with_mqa.weight"
    q = np.zeros((576, 7168), ml_dtypes.float8_e4m3fn)
    q[384:] = _fp8(rng, (192, 7168))
    scale = (0.001 * (0.5 + rng.random((5, 56)))).astype(np.float32)
    _poke(src, name, q[384:], 384 * 7168)
    _poke(src, name + "_scale_inv", scale)
    s = _slab(plan, name)
    assert s.out_bytes >= pipeline.JAX_MIN_BYTES  # the XLA dequantisation kernel
    r, c = np.arange(576)[:, None] // 128, np.arange(7168)[None, :] // 128
    want = s.entry.to_jaxmoe((q.astype(np.float32) * scale[r, c]).astype(BF16), plan.cfg)
    out = pipeline.compute_slab(src, plan, s)
    assert out.shape == plan.arrays[s.array].shape == (7168, 576)  # mtp.0.*: not stacked
    assert np.array_equal(out.view(np.uint16), np.asarray(want).view(np.uint16))

    # lm_head's last row block (ragged, transposed into lm_head_DV columns 112128:129280)
    h = "lm_head.weight"
    rows = {112_128: rng.standard_normal(7168), 129_279: rng.standard_normal(7168)}
    for row, v in rows.items():
        _poke(src, h, v.astype(BF16), row * 7168 * 2)
    s = _slab(plan, f"{h}@112128:129280")
    out = pipeline.compute_slab(src, plan, s)
    assert out.shape == (7168, 17_152) and out.dtype == BF16
    assert np.array_equal(out[:, 0], rows[112_128].astype(BF16))
    assert np.array_equal(out[:, -1], rows[129_279].astype(BF16))
    assert np.count_nonzero(out[:, 1:-1]) == 0

    # NaN / Inf refused, naming the file and tensor: an e4m3 NaN code in an expert, -inf in a
    # row block of the embedding (the pass-through path)
    e = "model.layers.60.mlp.experts.255.down_proj.weight"
    emb = "model.embed_tokens.weight"
    try:
        _poke(src, e, np.array([0x7F], np.uint8), 4000 * 2048 + 1000)
        where = re.escape(f"{src.file_of(e)}: tensor '{e}'")
        with pytest.raises(CheckpointError, match=where + r": nan at \[4000, 1000\]"):
            pipeline.compute_slab(src, plan, _slab(plan, e))
        _poke(src, emb, np.array([0xFF80], np.uint16), (40_000 * 7168 + 5) * 2)
        where = re.escape(f"{src.file_of(emb)}: tensor '{emb}'")
        with pytest.raises(CheckpointError, match=where + r": -inf at \[40000, 5\]"):  # not [2624, 5]
            pipeline.compute_slab(src, plan, _slab(plan, f"{emb}@37376:56064"))
    finally:  # back to zeros for the other tests
        _poke(src, e, np.zeros(1, np.uint8), 4000 * 2048 + 1000)
        _poke(src, emb, np.zeros(1, np.uint16), (40_000 * 7168 + 5) * 2)
