"""safetensors I/O, FP8 dequantisation and the loader's error reporting: every broken checkpoint raises
CheckpointError naming the file and/or tensor (dsv3-spec §6, §7)."""

import json
import shutil
import struct

import ml_dtypes
import numpy as np
import pytest

import jaxmoe
import oracle
from jaxmoe.hf_io import HFCheckpoint, dequantize_fp8
from jaxmoe.safetensors_io import CheckpointError, SafetensorsFile, write

BF16, FP8 = np.dtype(ml_dtypes.bfloat16), np.dtype(ml_dtypes.float8_e4m3fn)


def _tensors(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "f16": rng.standard_normal((4,)).astype(np.float16),
        "bf16": rng.standard_normal((2, 3, 4)).astype(BF16),
        "fp8": np.clip(rng.standard_normal((7, 9)) * 100, -448, 448).astype(FP8),
        "i64": rng.integers(-9, 9, size=(6,)),
        "i32": rng.integers(-9, 9, size=(2, 2)).astype(np.int32),
        "u8": rng.integers(0, 255, size=(5,)).astype(np.uint8),
        "bool": rng.random(3) > 0.5,
        "scalar": np.array(1.5, np.float32),
        "empty": np.zeros((0, 3), np.float32),
    }


def _same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8))


def _raw_file(path, header, data: bytes):
    blob = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


# ---------------------------------------------------------------------------------------------- round trip
def test_safetensors_round_trip(tmp_path):
    t = _tensors()
    p = tmp_path / "a.safetensors"
    n = write(p, t, metadata={"format": "pt"})
    assert n == p.stat().st_size
    f = SafetensorsFile(p)
    assert f.keys() == list(t) and f.metadata == {"format": "pt"}
    for k, v in t.items():
        assert f.shape(k) == v.shape and f.dtype(k) == v.dtype
        _same(f.get(k), v)


def test_safetensors_interop_with_reference_library(tmp_path):
    """Our files read in the safetensors library and vice versa, bf16 and float8_e4m3fn included."""
    import torch
    from safetensors.torch import load_file, save_file

    t = {k: v for k, v in _tensors(1).items() if k not in ("i64", "bool", "empty")}
    write(tmp_path / "ours.safetensors", t)
    theirs = load_file(str(tmp_path / "ours.safetensors"))
    assert theirs["bf16"].dtype == torch.bfloat16 and theirs["fp8"].dtype == torch.float8_e4m3fn
    for k, v in t.items():
        np.testing.assert_array_equal(theirs[k].float().numpy(), v.astype(np.float32))
    save_file({k: v.clone() for k, v in theirs.items()}, str(tmp_path / "theirs.safetensors"))
    f = SafetensorsFile(tmp_path / "theirs.safetensors")
    for k, v in t.items():
        _same(f.get(k), v)


# ------------------------------------------------------------------------------------------ broken files
def _good_file(tmp_path):
    p = tmp_path / "m.safetensors"
    write(p, {"a.weight": np.ones((4, 4), np.float32), "b.weight": np.arange(6, dtype=np.float32)})
    return p


@pytest.mark.parametrize("cut", [3, 24])
def test_truncated_data_names_file_and_tensor(tmp_path, cut):
    p = _good_file(tmp_path)
    p.write_bytes(p.read_bytes()[:-cut])  # chops into b.weight (3 bytes) or through it (24 bytes)
    with pytest.raises(CheckpointError, match=r"m\.safetensors.*b\.weight"):
        SafetensorsFile(p)


@pytest.mark.parametrize("keep", [0, 5, 20])
def test_truncated_header_names_file(tmp_path, keep):
    p = _good_file(tmp_path)
    p.write_bytes(p.read_bytes()[:keep])
    with pytest.raises(CheckpointError, match=r"m\.safetensors"):
        SafetensorsFile(p)


def test_corrupt_header_json_names_file(tmp_path):
    p = _raw_file(tmp_path / "m.safetensors", b'{"a.weight": {"dtype": "F32", ', b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"m\.safetensors"):
        SafetensorsFile(p)
    p = _raw_file(tmp_path / "m.safetensors", b"\xff\xfe" * 8, b"")
    with pytest.raises(CheckpointError, match=r"m\.safetensors"):
        SafetensorsFile(p)


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": [2]},                                   # no data_offsets
    {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]},          # would read header bytes as data
    {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]},            # unknown dtype
    {"shape": [2], "data_offsets": [0, 8]},                           # no dtype
    {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]},           # shape not a list
])
def test_corrupt_header_entry_names_file_and_tensor(tmp_path, entry):
    p = _raw_file(tmp_path / "m.safetensors", {"bad.weight": entry}, b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"m\.safetensors.*bad\.weight"):
        SafetensorsFile(p)


def test_overlapping_tensors_are_corrupt(tmp_path):
    """The safetensors format indexes the byte buffer entirely and without overlap."""
    h = {"a.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
         "b.weight": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    p = _raw_file(tmp_path / "m.safetensors", h, b"\0" * 12)
    with pytest.raises(CheckpointError, match=r"m\.safetensors.*(a|b)\.weight"):
        SafetensorsFile(p)


def test_wrong_byte_size_names_file_and_tensor(tmp_path):
    h = {"ok.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
         "w.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [8, 40]}}  # needs 64 bytes
    p = _raw_file(tmp_path / "m.safetensors", h, b"\0" * 40)
    with pytest.raises(CheckpointError, match=r"m\.safetensors.*w\.weight"):
        SafetensorsFile(p)


# ------------------------------------------------------------------------------------------------- FP8
def _fp8(rows, cols, seed=0):
    rng = np.random.default_rng(seed)
    w = np.clip(rng.standard_normal((rows, cols)) * 50, -448, 448).astype(FP8)
    s = (rng.random((-(-rows // 128), -(-cols // 128))) * 0.01 + 1e-4).astype(np.float32)
    return w, s


def test_dequantize_fp8_ragged_matches_spec():
    w, s = _fp8(576, 300)
    assert s.shape == (5, 3)
    want = np.empty((576, 300), np.float32)
    for i in range(5):  # spec §6: W[r, c] = float(W_fp8[r, c]) * scale_inv[r // 128, c // 128]
        for j in range(3):
            blk = (slice(128 * i, 128 * (i + 1)), slice(128 * j, 128 * (j + 1)))
            want[blk] = w[blk].astype(np.float32) * s[i, j]
    got = dequantize_fp8(w, s, 128, name="layers.0.kv_a_proj_with_mqa.weight")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape", [(4, 3), (5, 2), (5, 4), (3, 5), (5, 3, 1)])
def test_dequantize_fp8_wrong_scale_shape(shape):
    w, _ = _fp8(576, 300)
    with pytest.raises(CheckpointError, match="kv_a_proj"):
        dequantize_fp8(w, np.ones(shape, np.float32), 128, name="kv_a_proj")


@pytest.mark.parametrize("where", ["weight", "scale_nan", "scale_inf"])
def test_dequantize_fp8_nan_raises(where):
    w, s = _fp8(200, 130)
    if where == "weight":
        w[3, 7] = np.nan  # e4m3fn has a NaN but no inf
    else:
        s[1, 0] = np.nan if where == "scale_nan" else np.inf
    with pytest.raises(CheckpointError, match="o_proj"):
        dequantize_fp8(w, s, 128, name="o_proj")


def test_checkpoint_get_dequantizes_fp8_and_needs_the_scale(tmp_path):
    w, s = _fp8(130, 260)
    (tmp_path / "config.json").write_text("{}")
    write(tmp_path / "model.safetensors", {"x.weight": w, "x.weight_scale_inv": s, "y.weight": w})
    ck = HFCheckpoint(tmp_path)
    np.testing.assert_array_equal(ck.get("x.weight"), dequantize_fp8(w, s))
    with pytest.raises(CheckpointError, match="y.weight"):
        ck.get("y.weight")
    with pytest.raises(CheckpointError, match="z.weight"):
        ck.get("z.weight")


# ------------------------------------------------------------------------------- load_model on bad folders
@pytest.fixture(scope="module")
def hf_ckpt(tmp_path_factory):
    """A tiny transformers DeepSeek-V3 save: (folder, {name: float32 array})."""
    path = oracle.save_hf(oracle.build_hf("v3"), tmp_path_factory.mktemp("hf_v3"))
    f = SafetensorsFile(path / "model.safetensors")
    return path, {k: np.array(f.get(k)) for k in f.keys()}


def _folder(src, dst, tensors, n_shards=1):
    dst.mkdir(exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    if n_shards == 1:
        write(dst / "model.safetensors", tensors)
        return dst
    names = list(tensors)
    weight_map = {}
    for i in range(n_shards):
        fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = names[i::n_shards]
        write(dst / fname, {k: tensors[k] for k in part})
        weight_map.update({k: fname for k in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def test_load_model_baseline(hf_ckpt, tmp_path):
    src, t = hf_ckpt
    for folder in (src, _folder(src, tmp_path / "sharded", t, n_shards=3)):
        m = jaxmoe.load_model(folder)
        np.testing.assert_array_equal(np.asarray(m.embed_VD[...]), t["model.embed_tokens.weight"])
        np.testing.assert_array_equal(np.asarray(m.lm_head_DV[...]), t["lm_head.weight"].T)


@pytest.mark.parametrize("name", ["model.layers.1.mlp.experts.4.up_proj.weight",
                                  "model.layers.2.mlp.gate.e_score_correction_bias",
                                  "model.layers.0.mlp.down_proj.weight", "lm_head.weight",
                                  "model.layers.1.self_attn.kv_a_layernorm.weight"])
def test_load_model_missing_tensor(hf_ckpt, tmp_path, name):
    src, t = hf_ckpt
    assert name in t
    folder = _folder(src, tmp_path / "ck", {k: v for k, v in t.items() if k != name})
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        jaxmoe.load_model(folder)


@pytest.mark.parametrize("name", ["model.layers.1.mlp.experts.6.up_proj.weight",  # only experts 0..5 exist
                                  "model.layers.0.mlp.gate.weight",               # layer 0 is dense
                                  "model.bogus.weight"])
def test_load_model_unexpected_tensor(hf_ckpt, tmp_path, name):
    src, t = hf_ckpt
    assert name not in t
    folder = _folder(src, tmp_path / "ck", {**t, name: np.ones((24, 72), np.float32)})
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        jaxmoe.load_model(folder)


@pytest.mark.parametrize("name,shape", [
    ("model.norm.weight", (71,)),
    ("model.embed_tokens.weight", (72, 97)),
    ("model.layers.1.mlp.experts.0.up_proj.weight", (24, 71)),
    ("model.layers.1.mlp.gate.e_score_correction_bias", (5,)),
    ("model.layers.0.self_attn.q_a_proj.weight", (72, 28)),
    ("model.layers.1.self_attn.kv_b_proj.weight", (66, 21)),
    ("model.layers.1.self_attn.kv_b_proj.weight", (67, 20)),   # rows not a multiple of the 3 heads
    ("model.layers.2.self_attn.q_b_proj.weight", (61, 28)),
    ("model.layers.0.self_attn.o_proj.weight", (72, 31)),
])
def test_load_model_wrong_shape(hf_ckpt, tmp_path, name, shape):
    src, t = hf_ckpt
    assert t[name].shape != shape
    folder = _folder(src, tmp_path / "ck", {**t, name: np.zeros(shape, np.float32)})
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        jaxmoe.load_model(folder)


def test_load_model_index_lists_missing_shard(hf_ckpt, tmp_path):
    src, t = hf_ckpt
    folder = _folder(src, tmp_path / "ck", t, n_shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors"):
        jaxmoe.load_model(folder)


def test_load_model_index_points_to_wrong_shard(hf_ckpt, tmp_path):
    src, t = hf_ckpt
    folder = _folder(src, tmp_path / "ck", t, n_shards=2)
    idx = json.loads((folder / "model.safetensors.index.json").read_text())
    name = next(k for k, v in idx["weight_map"].items() if v.startswith("model-00002"))
    idx["weight_map"][name] = "model-00001-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        jaxmoe.load_model(folder)


def test_load_model_missing_config(hf_ckpt, tmp_path):
    src, t = hf_ckpt
    folder = _folder(src, tmp_path / "ck", t)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json"):
        jaxmoe.load_model(folder)


# ------------------------------------------------------------------------ malformed config / index JSON
@pytest.mark.parametrize("text,msg", [
    ('{"hidden_size": 64,', r"config\.json: not valid JSON"),
    ("[]", r"config\.json: expected a JSON object, found list"),
])
def test_load_model_malformed_config_json(hf_ckpt, tmp_path, text, msg):
    src, t = hf_ckpt
    folder = _folder(src, tmp_path / "ck", t)
    (folder / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=msg):
        jaxmoe.load_model(folder)


@pytest.mark.parametrize("key,value,msg", [
    ("hidden_size", "sixty-four", r"config\.json: hidden_size = 'sixty-four': expected an integer"),
    ("moe_intermediate_size", 32.0, r"config\.json: moe_intermediate_size = 32\.0: expected an integer"),
    ("quantization_config", {"weight_block_size": [128]},
     r"config\.json: quantization_config\.weight_block_size = \[128\]: expected two positive"),
])
def test_load_model_wrong_config_value_type(hf_ckpt, tmp_path, key, value, msg):
    src, t = hf_ckpt
    folder = _folder(src, tmp_path / "ck", t)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(CheckpointError, match=msg):
        jaxmoe.load_model(folder)


@pytest.mark.parametrize("index,msg", [
    ('{"weight_map": {"a": ', r"index\.json: not valid JSON"),
    ('["model-00001-of-00002.safetensors"]', r"index\.json: expected a JSON object, found list"),
    ('{"metadata": {}}', r"index\.json: needs a 'weight_map' object .*found none"),
    ('{"weight_map": ["a"]}', r"index\.json: needs a 'weight_map' object .*found a list"),
    ('{"weight_map": {"lm_head.weight": 1}}', r"index\.json: weight_map\['lm_head\.weight'\] = 1: expected"),
    ('{"weight_map": {"lm_head.weight": null}}', r"index\.json: weight_map\['lm_head\.weight'\] = None"),
])
def test_load_model_malformed_index(hf_ckpt, tmp_path, index, msg):
    src, t = hf_ckpt
    folder = _folder(src, tmp_path / "ck", t, n_shards=2)
    (folder / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match=msg):
        HFCheckpoint(folder)
    with pytest.raises(CheckpointError, match=msg):
        jaxmoe.load_model(folder)


@pytest.mark.parametrize("marker,msg", [
    ("{not json", "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"format": "%s", "complete": true}', "needs a 'config' object"),
    ('{"format": "%s", "complete": true, "config": [], "param_dtype": "float32"}',
     "needs a 'config' object"),
])
def test_converted_checkpoint_corrupt_marker_names_file(tmp_path, marker, msg):
    from jaxmoe import orbax_io
    (tmp_path / orbax_io.ORBAX_METADATA).write_text("{}")
    text = marker % orbax_io.FORMAT if "%s" in marker else marker
    (tmp_path / orbax_io.MARKER).write_text(text)
    with pytest.raises(CheckpointError, match=msg) as e:
        jaxmoe.load_model(str(tmp_path))
    assert orbax_io.MARKER in str(e.value)


@pytest.mark.parametrize("meta,msg", [("{oops", "not valid JSON"),
                                      ('{"tree_metadata": {"a": {}}}', "not Orbax tree metadata"),
                                      ('{"tree_metadata": 3}', "not Orbax tree metadata")])
def test_converted_checkpoint_corrupt_orbax_metadata_names_file(tmp_path, meta, msg):
    from jaxmoe import orbax_io
    (tmp_path / orbax_io.ORBAX_METADATA).write_text(meta)
    with pytest.raises(CheckpointError, match=msg) as e:
        orbax_io.stored_names(str(tmp_path))
    assert orbax_io.ORBAX_METADATA in str(e.value)
