"""Every bad input gives an error naming the file/tensor with expected vs found, and leaves
nothing at OUT_DIR that loads (no half-written checkpoint looking valid)."""

from __future__ import annotations

import hashlib
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
from jaxmoe import orbax_io, safetensors_io
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


# ------------------------------------------------------------------ output folder safety (CLI)
def _digest(folder):
    """sha256 of every file under `folder`, by relative path."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _refused(capsys, argv, *needles):
    """main(argv) exits 2 with a `jaxmoe-convert: error:` line holding every needle."""
    assert main(argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxmoe-convert: error:"), err
    for n in needles:
        assert str(n) in err, (n, err)
    return err


@pytest.fixture(scope="module")
def orbax(base, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("orbax") / "ckpt")
    convert(base, out)
    return out


@pytest.fixture
def src(base, tmp_path):
    """A private copy of the HF checkpoint (a regression may destroy it)."""
    p = str(tmp_path / "hf")
    shutil.copytree(base, p)
    return p


def test_output_overlapping_the_input_is_refused(src, orbax, tmp_path, capsys):
    """`convert HF HF --overwrite` used to replace the HF files by the Orbax ones (exit 0)."""
    before, before_o = _digest(src), _digest(orbax)
    for out, how in [(src, "is the input folder"), (os.path.join(src, "sub"), "inside the input"),
                     (str(tmp_path), "contains the input")]:
        for extra in ([], ["--overwrite"]):
            _refused(capsys, [src, out] + extra, os.path.abspath(out), src, how)
    link = str(tmp_path / "link")  # the same folder under another name
    os.symlink(src, link)
    _refused(capsys, [link, src, "--overwrite"], src, link, "is the input folder")
    partial_src = str(tmp_path / "x.partial")  # OUT.partial (deleted by --overwrite) = input
    os.symlink(src, partial_src)
    _refused(capsys, [partial_src, str(tmp_path / "x"), "--overwrite"], "partial folder",
             partial_src, "is the input folder")
    for out, how in [(orbax, "is the input folder"), (os.path.join(orbax, "x"), "inside"),
                     (os.path.dirname(orbax), "contains")]:
        _refused(capsys, ["export", orbax, out, "--overwrite"], orbax, os.path.abspath(out), how)
    assert _digest(src) == before and _digest(orbax) == before_o
    assert not os.path.exists(src + ".partial") and not os.path.exists(orbax + ".partial")
    jaxmoe.load_model(orbax)


def test_output_that_is_or_lies_under_a_file_is_refused(src, orbax, tmp_path, capsys):
    afile = str(tmp_path / "afile")
    with open(afile, "w") as f:
        f.write("keep me")
    for argv in ([src, afile], [src, afile, "--overwrite"], ["export", orbax, afile],
                 ["export", orbax, afile, "--overwrite"]):
        err = _refused(capsys, argv, afile, "is a file, not a folder")
        assert "pass --overwrite" not in err
    for argv in ([src, afile + "/out"], [src, afile + "/x/y", "--overwrite"],
                 ["export", orbax, afile + "/x"]):
        _refused(capsys, argv, argv[-1] if argv[-1] != "--overwrite" else argv[-2],
                 f"{afile} (above it) is a file, not a folder")
    assert open(afile).read() == "keep me" and sorted(os.listdir(tmp_path)) == ["afile", "hf"]


def test_overwrite_replaces_only_a_checkpoint_or_an_empty_folder(src, orbax, tmp_path, capsys):
    mine = tmp_path / "mine"  # a folder of the user's own files
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    (mine / "config.json").write_text("{}")  # config.json alone is no HF checkpoint
    for argv, needle in [([src, str(mine)], "choose another output folder"),
                         ([src, str(mine), "--overwrite"], "--overwrite only replaces"),
                         (["export", orbax, str(mine)], "choose another output folder"),
                         (["export", orbax, str(mine), "--overwrite"], "--overwrite only")]:
        err = _refused(capsys, argv, str(mine), "notes.txt", needle)
        assert "pass --overwrite" not in err
    # OUT.partial of other files is not deleted either (convert and export)
    part = tmp_path / "new.partial"
    part.mkdir()
    (part / "data.bin").write_text("mine too")
    _refused(capsys, [src, str(tmp_path / "new"), "--overwrite"], str(part), "data.bin")
    _refused(capsys, ["export", orbax, str(tmp_path / "new")], str(part), "data.bin")
    assert (mine / "notes.txt").read_text() == "precious"
    assert (part / "data.bin").read_text() == "mine too"
    # an export replaces an export only with --overwrite; an empty folder needs none
    hf = tmp_path / "exported"
    hf.mkdir()
    assert main(["export", orbax, str(hf), "--no-progress", "--max-shard-size", "50K"]) == 0
    _refused(capsys, ["export", orbax, str(hf)], str(hf), "already holds a Hugging Face",
             "pass --overwrite")
    assert main(["export", orbax, str(hf), "--no-progress", "--overwrite"]) == 0
    assert sorted(os.listdir(hf)) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["exported", "hf", "mine", "new.partial"]


def test_resume_and_overwrite_together_are_rejected(src, tmp_path, capsys):
    out = str(tmp_path / "out")
    with pytest.raises(SystemExit) as e:
        main([src, out, "--resume", "--overwrite", "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--resume and --overwrite contradict each other" in err and out + ".partial" in err
    assert not os.path.exists(out) and not os.path.exists(out + ".partial")


def test_resume_keeps_the_overwrite_choice_of_the_interrupted_run(src, tmp_path, monkeypatch,
                                                                   capsys):
    """--resume replaces a finished OUT only if the interrupted run had --overwrite."""
    from convert import writer

    def killed(tmp, out_dir):
        raise KeyboardInterrupt  # dies after sealing, before the rename

    out, other = str(tmp_path / "out"), str(tmp_path / "other")
    os.makedirs(out)  # a finished checkpoint (the marker is what --overwrite looks for)
    orbax_io.write_marker(out, CFG, "float32")
    _refused(capsys, [src, out, "--resume"], out, "already holds a finished checkpoint",
             f"no interrupted conversion to resume in {out}.partial")
    monkeypatch.setattr(writer, "install", killed)
    with pytest.raises(KeyboardInterrupt):
        convert(src, out, overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        convert(src, other)  # no --overwrite: there was nothing at `other` yet
    monkeypatch.undo()
    os.makedirs(other)  # ... but now a finished checkpoint is there
    orbax_io.write_marker(other, CFG, "float32")
    before = _digest(other)
    _refused(capsys, [src, other, "--resume"], other, "already holds a finished checkpoint",
             "was not started with --overwrite")
    assert _digest(other) == before
    assert main([src, out, "--resume", "--no-progress"]) == 0
    assert jaxmoe.load_model(out).cfg.num_hidden_layers == CFG.num_hidden_layers
    assert not os.path.exists(out + ".partial")


@pytest.mark.parametrize("flag, value", [
    ("--workers", "0"), ("--workers", "-3"), ("--workers", "two"), ("--batch", "-5"),
    ("--batch", "0K"), ("--batch", "nan"), ("--max-slab", "0"), ("--max-slab", "12X"),
    ("--max-shard-size", "0"), ("--max-shard-size", "-1G")])
def test_numbers_are_range_checked(flag, value, tmp_path, capsys):
    argv = [str(tmp_path / "in"), str(tmp_path / "out"), f"{flag}={value}"]
    with pytest.raises(SystemExit) as e:
        main(["export"] + argv if flag == "--max-shard-size" else argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: {value!r} is not a positive" in err, err
    assert not os.listdir(tmp_path)


def test_sizes_parse():
    from convert.cli import _size

    assert [_size(t) for t in ("65536", "64K", "64KiB", "1.5G", "256mb", "2T")] == \
        [65536, 65536, 65536, 3 << 29, 256 << 20, 2 << 40]
