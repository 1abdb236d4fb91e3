"""Atomicity and --resume (a real kill -9 mid-way), and the exact export <-> convert round trip."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import ml_dtypes
import numpy as np
import pytest

import jaxmoe
from convert import synth
from convert.cli import main
from convert.pipeline import convert
from jaxmoe import orbax_io
from jaxmoe.safetensors_io import CheckpointError, SafetensorsFile

CFG = jaxmoe.tiny(num_hidden_layers=3)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def fp8_src(tmp_path_factory):
    return synth.write_checkpoint(tmp_path_factory.mktemp("fp8") / "hf", CFG, fp8=True,
                                  max_shard_bytes=80_000)


@pytest.fixture(scope="module")
def bf16_src(tmp_path_factory):
    return synth.write_checkpoint(tmp_path_factory.mktemp("bf16") / "hf", CFG, fp8=False,
                                  max_shard_bytes=80_000, seed=3)


def _files(d):
    return sorted(f for f in os.listdir(d) if f != "d")


def _read(d, name):
    return open(os.path.join(d, name), "rb").read()


def test_killed_conversion_resumes_to_identical_bytes(fp8_src, tmp_path, capsys):
    clean = str(tmp_path / "clean")
    convert(fp8_src, clean, batch_bytes=16 << 10)
    out = str(tmp_path / "out")
    env = dict(os.environ, JAXMOE_CONVERT_SLAB_DELAY="0.03", JAX_PLATFORMS="cpu",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "convert", fp8_src, out, "--batch", "16K",
                             "--no-progress", "--workers", "2"], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    journal = os.path.join(out + ".partial", "convert_journal.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(journal) and len(open(journal).read().splitlines()) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()
    proc.kill()  # SIGKILL, mid-way
    proc.wait()
    assert proc.returncode == -9
    assert not os.path.exists(out)  # nothing at OUT_DIR; the partial folder does not load
    with pytest.raises(CheckpointError, match="not a finished jaxmoe checkpoint"):
        jaxmoe.load_model(out + ".partial")
    assert main([fp8_src, out, "--no-progress"]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main([fp8_src, out, "--no-progress", "--resume", "--dtype", "float32"]) == 2
    assert "different source or options" in capsys.readouterr().err
    assert main([fp8_src, out, "--no-progress", "--resume", "--batch", "16K"]) == 0
    summary = capsys.readouterr().out
    resumed = int(summary.split(" resumed")[0].split()[-1])
    total = int(summary.split("(")[1].split()[0]) + resumed
    assert 0 < resumed < total, summary
    assert orbax_io.kv_digest(out) == orbax_io.kv_digest(clean)  # every stored key and value
    assert _files(out) == _files(clean)
    for f in _files(out):
        if f != "manifest.ocdbt":  # (OCDBT's manifest names its randomly-named data files)
            assert _read(out, f) == _read(clean, f), f
    assert not os.path.exists(out + ".partial")


def _hf_tensors(d):
    idx = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(idx):
        with open(idx) as f:
            wm = json.load(f)["weight_map"]
    else:
        wm = {k: "model.safetensors" for k in SafetensorsFile(os.path.join(d, "model.safetensors")).keys()}
    return {n: np.array(SafetensorsFile(os.path.join(d, f)).get(n)) for n, f in wm.items()}


def _same_tensors(a, b):
    assert sorted(a) == sorted(b)
    for n in a:
        assert a[n].dtype == b[n].dtype and a[n].shape == b[n].shape, n
        assert np.array_equal(a[n].view(np.uint8), b[n].view(np.uint8)), n


def test_export_round_trip_is_exact(bf16_src, tmp_path):
    o1, hf2, o2 = (str(tmp_path / n) for n in ("o1", "hf2", "o2"))
    convert(bf16_src, o1)
    assert orbax_io.read_marker(o1)["param_dtype"] == "bfloat16"  # bf16 source kept bf16
    assert main(["export", o1, hf2, "--max-shard-size", "50K", "--no-progress"]) == 0
    assert len([f for f in os.listdir(hf2) if f.endswith(".safetensors")]) > 2
    with open(os.path.join(hf2, "config.json")) as f:
        assert "quantization_config" not in json.load(f)
    _same_tensors(_hf_tensors(hf2), _hf_tensors(bf16_src))  # HF -> Orbax -> HF: same bytes
    from convert.export import export

    export(o1, str(tmp_path / "hf3"), max_block_bytes=4096)  # big tensors in row blocks
    _same_tensors(_hf_tensors(str(tmp_path / "hf3")), _hf_tensors(bf16_src))
    convert(hf2, o2)
    assert orbax_io.kv_digest(o2) == orbax_io.kv_digest(o1)  # Orbax -> HF -> Orbax: same bytes


def test_fp8_conversion_round_trips_through_export(fp8_src, tmp_path):
    o1, hf2, o2 = (str(tmp_path / n) for n in ("o1", "hf2", "o2"))
    convert(fp8_src, o1)
    main(["export", o1, hf2, "--no-progress"])
    t = _hf_tensors(hf2)
    assert t["model.layers.1.mlp.experts.0.up_proj.weight"].dtype == ml_dtypes.bfloat16
    assert not any(n.endswith("_scale_inv") for n in t)
    convert(hf2, o2)
    assert orbax_io.kv_digest(o2) == orbax_io.kv_digest(o1)


def test_fine_tuned_model_saved_by_orbax_exports(bf16_src, tmp_path):
    """A model saved with orbax's own writer (save_model; e.g. after training) loads and
    exports like a converted one."""
    o1, saved, hf_a, hf_b = (str(tmp_path / n) for n in ("o1", "saved", "a", "b"))
    convert(bf16_src, o1)
    model = jaxmoe.load_model(o1, dtype=None)
    orbax_io.save_model(model, saved)
    again = jaxmoe.load_model(saved, dtype=None)
    assert np.array_equal(np.asarray(again.moe_layers.ffn.w_up_EDF[...]).view(np.uint16),
                          np.asarray(model.moe_layers.ffn.w_up_EDF[...]).view(np.uint16))
    main(["export", o1, hf_a, "--no-progress"])
    main(["export", saved, hf_b, "--no-progress"])
    _same_tensors(_hf_tensors(hf_a), _hf_tensors(hf_b))


def test_kill_between_seal_and_rename_is_recovered_by_resume(fp8_src, tmp_path, monkeypatch):
    from convert import writer

    out = str(tmp_path / "out")

    def killed(tmp, out_dir):
        raise KeyboardInterrupt  # the process dies after sealing, before the rename

    monkeypatch.setattr(writer, "install", killed)
    with pytest.raises(KeyboardInterrupt):
        convert(fp8_src, out)
    monkeypatch.undo()
    assert not os.path.exists(out) and writer.sealed(out + ".partial")
    st = convert(fp8_src, out, resume=True)
    assert st.slabs == 0 and os.path.exists(os.path.join(out, orbax_io.MARKER))
    assert not os.path.exists(os.path.join(out, writer.JOURNAL))
    jaxmoe.load_model(out)


def test_journal_tolerates_only_a_torn_last_line(tmp_path):
    """A kill mid-write can tear the journal's last line only: resuming drops the torn line
    before appending; any other bad line is a corrupt journal, reported with its line."""
    import convert.writer as W
    from convert.plan import Plan

    p = tmp_path / W.JOURNAL
    p.write_text('["a"]\n["b", "c"]\n["d", "e')  # torn by a kill
    assert W.read_journal(str(tmp_path)) == {"a", "b", "c"}
    w = W.Writer(str(tmp_path), Plan(cfg=CFG, dtype="float32", arrays={}, slabs=[],
                                     fingerprint=""))
    w.close()
    assert p.read_text() == '["a"]\n["b", "c"]\n'  # the next batch starts a clean line
    for bad in ('{oops', '3'):  # not JSON; JSON but not a list
        p.write_text('["a"]\n' + bad + '\n["b"]\n')
        with pytest.raises(CheckpointError, match=r"convert_journal.jsonl, line 2: .*corrupt"):
            W.read_journal(str(tmp_path))
