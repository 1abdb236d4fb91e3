"""Every bad input gives an error naming the file/tensor with expected vs found, and leaves
nothing at OUT_DIR that loads (no half-written checkpoint looking valid)."""

from __future__ import annotations

import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest

import jaxmoe
from convert import synth
from convert.cli import main
from convert.pipeline import convert
from jaxmoe import safetensors_io
from jaxmoe.safetensors_io import CheckpointError, SafetensorsFile

CFG = jaxmoe.tiny(num_hidden_layers=2)
NORM = "model.norm.weight"
QA = "model.layers.1.self_attn.q_a_proj.weight"
EXPERT = "model.layers.1.mlp.experts.2.up_proj.weight"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return synth.write_checkpoint(tmp_path_factory.mktemp("err") / "hf", CFG, fp8=True,
                                  max_shard_bytes=60_000)


def _index(path):
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        return json.load(f)


def _edit(path, name, fn):
    """Rewrite the shard holding `name`: fn(dict of tensors) mutates it in place."""
    idx = _index(path)
    fname = idx["weight_map"][name]
    f = SafetensorsFile(os.path.join(path, fname))
    tensors = {k: np.array(f.get(k)) for k in f.keys()}
    f.close()
    fn(tensors)
    safetensors_io.write(os.path.join(path, fname), tensors)
    idx["weight_map"] = {k: v for k, v in idx["weight_map"].items() if v != fname or k in tensors}
    idx["weight_map"].update({k: fname for k in tensors})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        json.dump(idx, fh)


def _config(path, fn):
    p = os.path.join(path, "config.json")
    with open(p) as f:
        c = json.load(f)
    fn(c)
    with open(p, "w") as f:
        json.dump(c, f)


def _shard_of(path, name):
    return os.path.join(path, _index(path)["weight_map"][name])


def _truncate(path):
    p = _shard_of(path, EXPERT)
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) // 2)


def _corrupt(path):
    with open(_shard_of(path, EXPERT), "r+b") as f:
        f.seek(8)
        f.write(b"\xff\xfe garbage")


def _set(name, value):
    def fn(t):
        t[name] = value(t[name])
    return fn


def _nan_fp8(a):
    a = a.copy()
    a.view(np.uint8)[3, 5] = 0x7F  # e4m3fn NaN code
    return a


def _inf(a):
    a = a.copy()
    a[7] = np.inf
    return a


CASES = {
    "missing shard": (lambda p: os.remove(_shard_of(p, EXPERT)),
                      ["model-000", "index.json is missing"]),
    "truncated shard": (_truncate, ["truncated", "model-000"]),
    "corrupt shard": (_corrupt, ["corrupt", "model-000"]),
    "missing tensor": (lambda p: _edit(p, EXPERT, lambda t: t.pop(EXPERT)),
                       [f"{EXPERT!r} missing", "[32, 64]"]),
    "extra tensor": (lambda p: _edit(p, NORM, lambda t: t.update(
        {"model.layers.1.mlp.bogus.weight": np.zeros(4, np.float32)})),
        ["unexpected tensor", "model.layers.1.mlp.bogus.weight"]),
    "wrong shape": (lambda p: _edit(p, NORM, _set(NORM, lambda a: np.ones(65, a.dtype))),
                    [f"{NORM!r}", "shape [65], expected [64]"]),
    "wrong dtype": (lambda p: _edit(p, NORM, _set(NORM, lambda a: np.ones(64, np.int32))),
                    [f"{NORM!r}", "dtype I32, expected one of"]),
    "scale missing": (lambda p: _edit(p, QA + "_scale_inv", lambda t: t.pop(QA + "_scale_inv")),
                      [f"FP8 tensor {QA!r}", "_scale_inv' missing"]),
    "scale shape": (lambda p: _edit(p, QA + "_scale_inv", _set(
        QA + "_scale_inv", lambda a: np.ones((3, 3), np.float32))),
        [f"{QA}_scale_inv", "shape [3, 3], expected [1, 1]"]),
    "nan after dequant": (lambda p: _edit(p, EXPERT, _set(EXPERT, _nan_fp8)),
                          [f"{EXPERT!r}", "nan at [3, 5] after FP8 dequantisation",
                           "expected finite"]),
    "inf in bf16": (lambda p: _edit(p, NORM, _set(NORM, _inf)),
                    [f"{NORM!r}", "inf at [7]", "expected finite"]),
    "no config.json": (lambda p: os.remove(os.path.join(p, "config.json")), ["no config.json"]),
    "config missing field": (lambda p: _config(p, lambda c: c.pop("hidden_size")),
                             ["config.json", "missing required field", "hidden_size"]),
    "config contradicts tensors": (lambda p: _config(p, lambda c: c.update(
        moe_intermediate_size=40)), ["shape [32, 64], expected [40, 64] from config.json"]),
    "config contradicts layer count": (lambda p: _config(p, lambda c: c.update(
        num_hidden_layers=1)), ["unexpected tensor", "model.layers.1."]),
    "fp8 without quantization_config": (lambda p: _config(
        p, lambda c: c.pop("quantization_config")), ["F8_E4M3 but config.json has no "
                                                     "quantization_config"]),
}


def _not_loadable(out):
    assert not os.path.exists(out)
    for p in (out, out + ".partial"):
        with pytest.raises((CheckpointError, FileNotFoundError, ValueError)):
            jaxmoe.load_model(p)


@pytest.mark.parametrize("case", sorted(CASES))
def test_error_names_the_problem_and_leaves_nothing_loadable(base, tmp_path, case):
    mutate, needles = CASES[case]
    src = str(tmp_path / "hf")
    shutil.copytree(base, src)
    mutate(src)
    out = str(tmp_path / "out")
    with pytest.raises(CheckpointError) as e:
        convert(src, out, workers=2)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))
    _not_loadable(out)


def test_cli_reports_errors_and_refuses_a_finished_output(base, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main([base, out, "--no-progress"]) == 0
    before = sorted(os.listdir(out))
    assert main([base, out, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "already holds a finished checkpoint" in err and "--overwrite" in err
    assert sorted(os.listdir(out)) == before  # untouched
    jaxmoe.load_model(out)
    assert main([base, out, "--no-progress", "--overwrite", "--dtype", "float32"]) == 0
    assert jaxmoe.load_model(out, dtype=None).cfg.param_dtype == "float32"
    assert not os.path.exists(out + ".old") and not os.path.exists(out + ".partial")


def test_fp8_e5m2_is_refused(base, tmp_path):
    src = str(tmp_path / "hf")
    shutil.copytree(base, src)
    _edit(src, EXPERT, _set(EXPERT, lambda a: a.astype(np.float32).astype(ml_dtypes.float8_e5m2)))
    with pytest.raises(CheckpointError, match="dtype F8_E5M2, expected one of"):
        convert(src, str(tmp_path / "out"))
