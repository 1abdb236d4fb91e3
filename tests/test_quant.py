"""Quantized weights read through `layers.params.weight`.

FP8 (dsv3-spec §6): a checkpoint in the published format (convert/synth.py: e4m3 weights with
float32 128x128 `weight_scale_inv`, ragged edge blocks) loaded with its FP8 tensors kept
(`load_model(fp8="keep")`, `jaxmoe-convert --keep-fp8`) gives effective weights bit-identical to
the dequantised model's (the spec formula, rounded once to the dtype); its logits are within
1e-5 max|diff|/max|ref| of the dequantised model's in float32 (measured 1.3e-6: the weights are
equal, only the order of the operations differs) and within TOL_BF16 = 1e-3 in bfloat16
(measured 7.3e-5). The resident weight bytes of the FP8
parameters are half their bfloat16 bytes plus the scales. `jaxmoe-generate --fp8 keep` streams
the FP8 model's greedy continuation.

int8 experts: per-output-channel symmetric quantisation; each weight within half a step of the
original, and generation reads exactly those values (its logits against a float model holding
the dequantised values: 1e-5). How far int8 moves the logits of the float model is measured in
bench/bench_generate.py, not asserted: on these tiny random models a flipped expert choice moves
a token's logits by tens of percent.
"""

from __future__ import annotations

import io
import json
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxmoe
import parity_util as pu
import test_generate as tg
from convert import synth
from jaxmoe.generate import cli, engine
from jaxmoe.generate.tokenizer import ByteTokenizer
from jaxmoe.layers.params import weight
from jaxmoe.quant import FP8Block, Int8Weight, quantize_experts_int8, weight_bytes
from jaxmoe.quant.fp8 import fp8_paths, get_attr

TOL_BF16 = 1e-3
TOL_F32 = 1e-5
EXPERTS = ("w_gate_EDF", "w_up_EDF", "w_down_EFD")
engine.set_compiler_options(pu.FAST_COMPILE)

# kv_a_proj_with_mqa: 136 + 8 = 144 rows -> a ragged 16-row block; hidden 160 -> ragged columns.
CFG = jaxmoe.tiny(hidden_size=160, q_lora_rank=96, kv_lora_rank=136, qk_rope_head_dim=8,
                  qk_nope_head_dim=16, v_head_dim=16, num_attention_heads=2,
                  intermediate_size=200, moe_intermediate_size=48, vocab_size=300,
                  max_position_embeddings=64)
PROMPT = "def main():"


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    rng = np.random.default_rng(0)
    specs = synth.tensor_specs(CFG, fp8=False, dtype=np.float32)
    weights = {n: (1 + 0.1 * rng.standard_normal(s) if n.endswith("norm.weight") else
                   0.08 * rng.standard_normal(s)).astype(np.float32) for n, _, s in specs}
    return synth.write_checkpoint(tmp_path_factory.mktemp("fp8") / "hf", CFG, fp8=True,
                                  tensors=weights, max_shard_bytes=150_000)


def _flat(model) -> dict:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


@pu.jit(static_argnums=(0, 2))
def _effective(graphdef, state, paths):
    m = nnx.merge(graphdef, state)
    return [weight(get_attr(m, p), m.cfg).astype(jnp.float32) for p in paths]


# one parameter per layout transform, ragged blocks, stacked experts and the MTP layer
PATHS = (("dense_layers", "attn", "wkv_a_DP"), ("dense_layers", "attn", "wq_b_QNJ"),
         ("moe_layers", "attn", "wo_NGD"), ("moe_layers", "ffn", "w_down_EFD"),
         ("moe_layers", "ffn", "shared", "w_gate_DF"), ("mtp", 0, "layer", "attn", "wkv_b_CNI"),
         ("mtp", 0, "layer", "ffn", "w_up_EDF"))


def effective_weights(model) -> list:
    graphdef, state = nnx.split(model)
    return _effective(graphdef, state, PATHS)


def test_fp8_weights_equal_the_dequantised_model(fp8_dir):
    for dtype in ("float32", "bfloat16"):
        kept = jaxmoe.load_model(fp8_dir, dtype=dtype, fp8="keep", mtp=True)
        deq = jaxmoe.load_model(fp8_dir, dtype=dtype, mtp=True)
        assert set(PATHS) <= set(fp8_paths(kept.cfg))
        assert all(isinstance(get_attr(kept, p), FP8Block) for p in fp8_paths(kept.cfg))
        a, b = effective_weights(kept), effective_weights(deq)
        for p, x, y in zip(PATHS, a, b):
            blk = get_attr(kept, p)
            assert isinstance(blk, FP8Block) and blk.q[...].dtype == jnp.float8_e4m3fn
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"{dtype} {p}")


def test_fp8_weight_bytes_halve_bfloat16(fp8_dir):
    kept = jaxmoe.load_model(fp8_dir, dtype="bfloat16", fp8="keep", mtp=False)
    deq = jaxmoe.load_model(fp8_dir, dtype="bfloat16", mtp=False)
    n_fp8 = sum(get_attr(kept, p).q[...].size for p in fp8_paths(kept.cfg))
    scales = sum(get_attr(kept, p).scale_inv[...].nbytes for p in fp8_paths(kept.cfg))
    assert weight_bytes(deq) - weight_bytes(kept) == 2 * n_fp8 - n_fp8 - scales
    assert scales < 0.01 * n_fp8


def test_fp8_cli_streams_and_matches_dequantised_bf16(fp8_dir, monkeypatch):
    # jaxmoe-generate --fp8 keep (byte-level fallback, one prompt: streamed as produced)
    writes = []

    class Tap(io.StringIO):
        def write(self, text):
            writes.append(text)
            return super().write(text)

    monkeypatch.setattr(sys, "stdout", Tap())
    rc = cli.main(["--ckpt", str(fp8_dir), "--fp8", "keep", "--prompt", PROMPT,
                   "--max-new-tokens", "8", "--eos-id", "-1"])
    out = sys.stdout.getvalue()
    monkeypatch.undo()
    assert rc == 0
    kept = jaxmoe.load_model(fp8_dir, fp8="keep", mtp=False)
    new = engine.generate(kept, [list(PROMPT.encode())], 8, eos_id=None)[0]
    assert out == PROMPT + ByteTokenizer().decode(new) + "\n"
    pieces = [w for w in writes if w]  # (random bytes: incomplete UTF-8 is held back)
    assert pieces[0] == PROMPT and len(pieces) >= 3, f"not written as produced: {pieces}"
    # logits over prompt + continuation: FP8 weights vs the dequantised bf16 model
    seq = np.array([list(PROMPT.encode()) + new], np.int32)
    for dtype, tol in (("float32", TOL_F32), ("bfloat16", TOL_BF16)):
        a = pu.forward(jaxmoe.load_model(fp8_dir, dtype=dtype, fp8="keep", mtp=False), seq)
        b = pu.forward(jaxmoe.load_model(fp8_dir, dtype=dtype, mtp=False), seq)
        pu.assert_rel(a.logits, b.logits, tol, f"FP8 weights vs dequantised {dtype} model")


def test_convert_keep_fp8_roundtrip(fp8_dir, tmp_path):
    from convert import cli as convert_cli

    out = tmp_path / "orbax"
    assert convert_cli.main([str(fp8_dir), str(out), "--keep-fp8", "--no-progress",
                             "--workers", "1"]) == 0
    meta = json.loads((out / "jaxmoe.json").read_text())
    assert meta["fp8"]["moe_layers.ffn.w_gate_EDF"] == {"transform": "T", "block": [128, 128]}
    a = _flat(jaxmoe.load_model(out, dtype="bfloat16", mtp=True))
    b = _flat(jaxmoe.load_model(fp8_dir, dtype="bfloat16", fp8="keep", mtp=True))
    assert set(a) == set(b)
    assert a[("moe_layers", "ffn", "w_gate_EDF", "q")].dtype == jnp.float8_e4m3fn
    for k in a:
        np.testing.assert_array_equal(a[k].astype(np.float32), b[k].astype(np.float32), str(k))
    # export back to HF bf16 = the dequantised checkpoint in bf16
    assert convert_cli.main(["export", str(out), str(tmp_path / "hf"), "--no-progress"]) == 0
    c = _flat(jaxmoe.load_model(tmp_path / "hf", dtype="bfloat16", mtp=True))
    d = _flat(jaxmoe.load_model(fp8_dir, dtype="bfloat16", mtp=True))
    for k in d:
        np.testing.assert_array_equal(c[k].astype(np.float32), d[k].astype(np.float32), str(k))
    assert os.path.isdir(out)


def test_fp8_keep_refuses_a_missing_scale(fp8_dir, tmp_path):
    import shutil

    from jaxmoe.safetensors_io import CheckpointError

    bad = tmp_path / "bad"
    shutil.copytree(fp8_dir, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    del index["weight_map"][name + "_scale_inv"]
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"FP8 tensor '{name}' has no scale"):
        jaxmoe.load_model(bad, fp8="keep")


def test_fp8_keep_refuses_nan_codes(fp8_dir, tmp_path):
    import shutil
    import struct

    from jaxmoe.safetensors_io import CheckpointError

    bad = tmp_path / "bad"
    shutil.copytree(fp8_dir, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    path = bad / index["weight_map"][name]
    blob = bytearray(path.read_bytes())
    n = struct.unpack("<Q", blob[:8])[0]
    start = 8 + n + json.loads(blob[8:8 + n])[name]["data_offsets"][0]
    blob[start + 5] = 0xFF  # e4m3fn NaN (s.1111.111)
    path.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match=f"'{name}': FP8 NaN codes"):
        jaxmoe.load_model(bad, fp8="keep")


# ------------------------------------------------------------------------------------- int8
def test_int8_experts():
    """Each weight within half a quantisation step; generation with the int8 experts equals the
    float model holding the same (dequantised) values: the storage is read exactly."""
    q = quantize_experts_int8(pu.load(pu.saved("v3")))
    same = pu.load(pu.saved("v3"))  # float32 Params, set to the int8 values below
    ref = pu.load(pu.saved("v3"))
    ffn = q.moe_layers.ffn
    for name in EXPERTS:
        blk, w = getattr(ffn, name), np.asarray(getattr(ref.moe_layers.ffn, name)[...])
        assert isinstance(blk, Int8Weight) and blk.q[...].dtype == jnp.int8
        deq = np.asarray(weight(blk, q.cfg))
        step = np.asarray(blk.scale[...])  # [L, E, 1, out]
        np.testing.assert_allclose(np.abs(w).max(axis=-2, keepdims=True) / 127, step, rtol=1e-6)
        assert (np.abs(deq - w) <= step / 2 * (1 + 1e-5)).all(), name
        getattr(same.moe_layers.ffn, name).set_value(jnp.asarray(deq))
    n_exp = sum(getattr(ffn, n).q[...].size for n in EXPERTS)
    scales = sum(getattr(ffn, n).scale[...].nbytes for n in EXPERTS)
    assert weight_bytes(ref) - weight_bytes(q) == 4 * n_exp - n_exp - scales
    prompts = tg.prompts_of(tg.LENS, ref.cfg.vocab_size)
    kw = dict(prefill_chunk=tg.CHUNK, eos_id=None, keep_logits=True)
    a, b = engine.run(q, prompts, tg.NEW, **kw), engine.run(same, prompts, tg.NEW, **kw)
    assert a.tokens == b.tokens
    pu.assert_rel(a.logits, b.logits, 1e-5, "int8 experts vs the same values as float32")
