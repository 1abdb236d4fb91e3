"""FP8 checkpoints in the published format (dsv3-spec §6-§7): the converted model equals the model
built from the spec's dequantisation formula W = float(W_fp8) * scale_inv[r // 128, c // 128]."""

from __future__ import annotations

import json
import math
import os

import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import jaxmoe
from convert import pipeline, synth
from convert.fp8 import dequantize_rows
from jaxmoe import hf_io, orbax_io, safetensors_io
from jaxmoe.safetensors_io import SafetensorsFile

# kv_a_proj_with_mqa: 136 + 8 = 144 rows -> a ragged 16-row block; hidden 160 -> ragged columns.
CFG = jaxmoe.tiny(hidden_size=160, q_lora_rank=96, kv_lora_rank=136, qk_rope_head_dim=8,
                  qk_nope_head_dim=16, v_head_dim=16, num_attention_heads=2,
                  intermediate_size=200, moe_intermediate_size=48, vocab_size=300)


def formula(q: np.ndarray, s: np.ndarray) -> np.ndarray:
    r = np.arange(q.shape[0])[:, None] // 128
    c = np.arange(q.shape[1])[None, :] // 128
    return q.astype(np.float32) * s[r, c]


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp8")
    rng = np.random.default_rng(0)
    specs = synth.tensor_specs(CFG, fp8=False, dtype=np.float32)
    weights = {n: (1 + 0.1 * rng.standard_normal(s) if n.endswith("norm.weight") else
                   0.05 * rng.standard_normal(s)).astype(np.float32) for n, _, s in specs}
    path = synth.write_checkpoint(d / "hf", CFG, fp8=True, tensors=weights,
                                  max_shard_bytes=150_000)
    return path


def _tensors(path):
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        wm = json.load(f)["weight_map"]
    return {n: SafetensorsFile(os.path.join(path, f)).get(n) for n, f in wm.items()}, wm


def test_fixture_is_the_published_format(fp8_ckpt):
    with open(os.path.join(fp8_ckpt, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    assert qc == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                  "weight_block_size": [128, 128]}
    t, wm = _tensors(fp8_ckpt)
    kv = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    assert t[kv].dtype == ml_dtypes.float8_e4m3fn and t[kv].shape == (144, 160)
    assert t[kv + "_scale_inv"].dtype == np.float32 and t[kv + "_scale_inv"].shape == (2, 2)
    e = "model.layers.1.mlp.experts.3.down_proj.weight"
    assert t[e].dtype == ml_dtypes.float8_e4m3fn and t[e + "_scale_inv"].shape == (2, 1)
    assert t["model.embed_tokens.weight"].dtype == ml_dtypes.bfloat16
    assert t["model.layers.1.mlp.gate.weight"].dtype == ml_dtypes.bfloat16
    assert t["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == np.float32
    assert t["model.layers.3.eh_proj.weight"].dtype == ml_dtypes.bfloat16  # MTP, not FP8
    assert len(set(wm.values())) > 3  # sharded; a weight and its scale may be in different files


def _reference_folder(src, dst, dtype):
    """The same checkpoint with every FP8 weight replaced by the spec formula's result."""
    t, _ = _tensors(src)
    out = {}
    for n, a in t.items():
        if n.endswith("_scale_inv"):
            continue
        out[n] = formula(a, t[n + "_scale_inv"]).astype(dtype) if a.dtype.itemsize == 1 else a
    os.makedirs(dst)
    safetensors_io.write(os.path.join(dst, "model.safetensors"), out)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg.pop("quantization_config")
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return dst


@pytest.mark.parametrize("dtype,jax_path,max_slab", [("bfloat16", False, None),
                                                     ("float32", False, 8192),
                                                     ("bfloat16", True, 8192)])
def test_converted_equals_spec_formula(fp8_ckpt, tmp_path, monkeypatch, dtype, jax_path,
                                       max_slab):
    """max_slab 8 KiB: embeddings, heads and dense MLPs are written in 128-row blocks (the last
    one ragged, a partial zarr edge chunk)."""
    if jax_path:  # every slab through the XLA kernels (ragged blocks via padding)
        monkeypatch.setattr(pipeline, "JAX_MIN_BYTES", 0)
    out = str(tmp_path / "out")
    st = pipeline.convert(fp8_ckpt, out, dtype=None if dtype == "bfloat16" else dtype, workers=2,
                          **({"max_slab_bytes": max_slab} if max_slab else {}))
    assert (st.slabs > st.tensors) == bool(max_slab)
    got = orbax_io.load_model(out, dtype=None)
    assert got.cfg.param_dtype == dtype  # FP8 -> bfloat16 by default
    ref_np = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    ref = hf_io.load_model(_reference_folder(fp8_ckpt, str(tmp_path / "ref"), ref_np), dtype=dtype)
    a, b = nnx.to_flat_state(nnx.state(got)), dict(nnx.to_flat_state(nnx.state(ref)))
    assert len(a) == len(b) and any(p[0] == "mtp" for p, _ in a)
    for p, v in a:
        x, y = np.asarray(v.get_value()), np.asarray(b[p].get_value())
        assert x.dtype == y.dtype and np.array_equal(x.view(np.uint8), y.view(np.uint8)), p


@pytest.mark.parametrize("rows,cols,row0", [(576, 7168, 0), (100, 300, 128), (256, 130, 0)])
def test_blockwise_dequant_matches_formula(rows, cols, row0):
    """Including the real kv_a_proj_with_mqa shape (576 rows -> scale [5, 56])."""
    rng = np.random.default_rng(1)
    q = rng.integers(0, 256, (rows, cols), dtype=np.uint8)
    q[(q & 0x7F) == 0x7F] = 0
    q = q.view(ml_dtypes.float8_e4m3fn)
    full_rows = row0 + rows
    s = (rng.random((math.ceil(full_rows / 128), math.ceil(cols / 128))) + 0.5).astype(np.float32)
    want = formula(np.concatenate([np.zeros((row0, cols), q.dtype), q]), s)[row0:]
    got = dequantize_rows(q, s[row0 // 128:], row0, (128, 128), np.float32, "w")
    assert np.array_equal(got, want)
    if row0 == 0:
        assert np.array_equal(got, hf_io.dequantize_fp8(q, s))
        y = np.asarray(pipeline._dequant_jax(q, s, (128, 128), ml_dtypes.bfloat16))
        assert np.array_equal(y.view(np.uint16), want.astype(ml_dtypes.bfloat16).view(np.uint16))


def test_671b_plan_matches_the_published_inventory():
    """Names, dtypes and shapes of the real release (dsv3-spec §7): 91,991 tensors,
    688,574,839,360 bytes, kv_a scale [5, 56]."""
    specs = synth.tensor_specs(jaxmoe.deepseek_v3_671b(), fp8=True)
    assert len(specs) == 91_991
    assert sum(math.prod(s) * d.itemsize for _, d, s in specs) == 688_574_839_360
    d = {n: (dt, s) for n, dt, s in specs}
    assert d["model.layers.61.self_attn.kv_a_proj_with_mqa.weight_scale_inv"][1] == (5, 56)
    assert d["model.layers.0.mlp.down_proj.weight_scale_inv"][1] == (56, 144)
    assert d["model.layers.5.mlp.experts.255.up_proj.weight"] == (synth.E4M3, (2048, 7168))
    assert sum(1 for _, dt, _ in specs if dt == synth.E4M3) == 45_808
