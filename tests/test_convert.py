"""Converter parity: tiny transformers checkpoints (+ MTP tensors per dsv3-spec §5) -> jaxmoe-convert
-> jaxmoe.load_model gives transformers' logits (float32); sharded restore; --verify; the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import jaxmoe
import oracle
import reference
from convert.cli import main
from convert.pipeline import convert
from jaxmoe import hf_mapping, orbax_io, safetensors_io
from jaxmoe.hf_io import HFCheckpoint

TOKENS = np.array([[0, 5, 17, 33, 2, 60, 41, 9, 88, 3]], np.int32)


def hf_fixture(path, name, *, mtp=True, max_shard_size=None, seed=0):
    """save_pretrained of a tiny oracle model, plus the MTP layer's tensors in their own shard."""
    m = oracle.build_hf(name, seed=seed, init_std=0.08)
    oracle.save_hf(m, path, max_shard_size=max_shard_size)
    weights = None
    if mtp:
        weights = reference.make_mtp_weights(m.config, seed=seed + 1, init_std=0.08)
        fname = "model-mtp.safetensors"
        safetensors_io.write(os.path.join(path, fname), weights, {"format": "pt"})
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                idx = json.load(f)
            idx["weight_map"].update({k: fname for k in weights})
            with open(index, "w") as f:
                json.dump(idx, f)
    return m, str(path), weights


def rel_err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    """v3 with MTP, sharded with an index file, converted to float32."""
    d = tmp_path_factory.mktemp("v3")
    m, hf, mtp = hf_fixture(d / "hf", "v3", max_shard_size="100KB")
    assert os.path.exists(os.path.join(hf, "model.safetensors.index.json"))
    out = str(d / "out")
    st = convert(hf, out, workers=2)
    return m, hf, mtp, out, st


def test_v3_sharded_with_mtp_matches_transformers(v3):
    m, hf, mtp, out, st = v3
    assert st.slabs == len({e.hf_name for e in hf_mapping.entries(orbax_io.config_of(
        orbax_io.read_marker(out)))}) and st.skipped == 0
    model = jaxmoe.load_model(out, dtype="float32")
    assert model.cfg.num_nextn_predict_layers == 1 and model.cfg.param_dtype == "float32"
    assert model.embed_VD[...].dtype == np.float32  # float32 source kept float32
    fo = nnx.jit(lambda m, t: m.forward(t, with_mtp=True))(model, TOKENS)
    assert rel_err(fo.logits, oracle.hf_logits(m, TOKENS)) < 1e-5
    # the MTP layer landed in the MTP module: its logits follow the spec's reference (§5.2)
    h = oracle.hf_final_hidden(m, TOKENS)
    ref = reference.mtp_ref(m.config, mtp, h, TOKENS)
    assert rel_err(fo.mtp_logits[0], ref) < 1e-5


@pytest.mark.parametrize("name", ["v2", "v3_shared0_dense0"])
def test_single_file_configs_match_transformers(tmp_path, name):
    m, hf, _ = hf_fixture(tmp_path / "hf", name, mtp=name.startswith("v3"))
    out = str(tmp_path / "out")
    convert(hf, out, dtype="float32", workers=1)
    model = jaxmoe.load_model(out, dtype="float32")
    assert rel_err(nnx.jit(lambda m, t: m(t))(model, TOKENS), oracle.hf_logits(m, TOKENS)) < 1e-5


def test_restore_with_target_shardings(v3):
    """Each array restored straight into a NamedSharding (experts split over 'x', the rest
    replicated); values equal the single-device restore; restore_state feeds a built model."""
    _, _, _, out, _ = v3
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("x",))
    P = jax.sharding.PartitionSpec

    def sharding(path, sds):
        if path[-1] in ("w_gate_EDF", "w_up_EDF", "w_down_EFD") and path[0] == "moe_layers":
            return jax.sharding.NamedSharding(mesh, P(None, "x"))  # [L, E, ...]: E over x
        return jax.sharding.NamedSharding(mesh, P())

    sharded = jaxmoe.load_model(out, dtype="bfloat16", sharding=sharding)
    w = sharded.moe_layers.ffn.w_gate_EDF[...]
    assert w.dtype == jax.numpy.bfloat16 and w.sharding.spec == P(None, "x")
    assert {s.data.shape for s in w.addressable_shards} == {(w.shape[0], w.shape[1] // 2) +
                                                             w.shape[2:]}
    plain = orbax_io.load_model(out, dtype="bfloat16")
    for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(sharded)),
                              nnx.to_flat_state(nnx.state(plain))):
        assert np.array_equal(np.asarray(a.get_value()), np.asarray(b.get_value())), p
    # trainer-style: restore an abstract (or live) model's state, then nnx.merge / nnx.update
    from jaxmoe.hf_io import abstract_model

    graphdef, abstract = nnx.split(abstract_model(plain.cfg))
    state = orbax_io.restore_state(out, abstract, sharding)
    model = nnx.merge(graphdef, state)
    assert np.array_equal(np.asarray(model.lm_head_DV[...]), np.asarray(plain.lm_head_DV[...]))


def test_orbax_restores_it_natively(v3):
    """orbax's own StandardCheckpointer reads the layout (metadata, shapes, dtypes, values)."""
    import orbax.checkpoint as ocp

    _, hf, _, out, _ = v3
    meta = ocp.StandardCheckpointer().metadata(out)
    tree = meta.item_metadata.tree
    assert tree["moe_layers"]["ffn"]["w_gate_EDF"].shape == (2, 6, 72, 24)
    target = {"lm_head_DV": jax.ShapeDtypeStruct((72, 97), np.float32)}
    got = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(
        out, args=ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                         restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
    assert np.array_equal(np.asarray(got["lm_head_DV"]), HFCheckpoint(hf).get("lm_head.weight").T)


def test_verify_and_summary(v3, capfd):
    _, hf, _, _, _ = v3
    out = os.path.join(os.path.dirname(hf), "verified")
    assert main([hf, out, "--dtype", "float32", "--verify", "--no-progress", "--workers", "1"]) == 0
    text, noise = capfd.readouterr()
    assert "parameters" in text and "GB/s" in text
    # transformers' loading progress bar and load report stay out of --verify's output
    assert "Loading weights" not in text + noise and "LOAD REPORT" not in (text + noise).upper()
    err = float(text.split("max relative logit error ")[1].split()[0])
    assert err < 1e-5


def test_cli_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "convert", "export", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "ORBAX" in r.stdout.upper()


_SHOW_TUNABLES = ("import os, sys; from convert import hugepages; hugepages.ensure(); "
                  "print(os.environ.get('GLIBC_TUNABLES'), 'jax' in sys.modules)")


@pytest.mark.parametrize("env, want", [
    ({}, "glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
     "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    ({"JAXMOE_CONVERT_NO_HUGEPAGES": "1"}, "None"),
])
def test_entry_point_reexecs_with_huge_pages(env, want):
    """The process entry re-executes itself once, before jax is imported, with glibc malloc's
    transparent-huge-page tunable added to (not replacing) GLIBC_TUNABLES."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("GLIBC_TUNABLES", "JAXMOE_CONVERT_NO_HUGEPAGES")}
    r = subprocess.run([sys.executable, "-c", _SHOW_TUNABLES], capture_output=True, text=True,
                       timeout=60, env=dict(base, **env))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [want, "False"]


def test_export_loads_in_transformers(v3, tmp_path):
    """export (float32) -> transformers from_pretrained -> the original model's logits."""
    import torch
    import transformers

    m, _, _, out, _ = v3
    hf = str(tmp_path / "exported")
    assert main(["export", out, hf, "--dtype", "float32", "--max-shard-size", "200K",
                 "--no-progress"]) == 0
    cfg = transformers.AutoConfig.from_pretrained(hf)
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    back = transformers.AutoModelForCausalLM.from_pretrained(hf, config=cfg, dtype=torch.float32)
    assert np.array_equal(oracle.hf_logits(back.eval(), TOKENS), oracle.hf_logits(m, TOKENS))
