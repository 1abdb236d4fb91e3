"""Mesh presets: shapes, device checks, rule conflicts, spec resolution, golden PartitionSpec
dumps (tests/golden/partition_specs; regenerate with `python -m pjit_configs.golden`), the
expert-parallel scope a preset opens, and `--mesh.name` in the trainer."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

import pjit_configs
from jaxmoe import axes as A
from jaxmoe.parallel.sharding import RulesError, constrain, spec_for
from pjit_configs import golden
from pjit_configs import rules as R
from pjit_configs.presets import CLUSTER, SLICE


def test_presets_cover_the_targets():
    sizes = {n: pjit_configs.get(n).size for n in pjit_configs.PRESETS}
    assert sizes["cpu-8"] == sizes["cpu-8-dp"] == sizes["cpu-2x4"] == 8
    assert sizes["v5p-1024"] == 512 and sizes["v5p-256"] == 128  # v5p-N: N TensorCores
    assert sizes["v6e-256"] == 256 and sizes["v6e-256x2"] == 512
    assert sizes["h100-8"] == sizes["h200-8"] == 8
    c = pjit_configs.get("h200-32x8")
    assert (c.size, c.dcn, c.expert, c.hbm_gib) == (256, 32, 8, 141.0)
    assert pjit_configs.get("v6e-256x2").dcn == 2
    for n in pjit_configs.PRESETS:
        p = pjit_configs.get(n)
        assert p.ep in pjit_configs.mesh.EP_CHOICES and p.rules
    with pytest.raises(pjit_configs.PresetError, match="unknown mesh preset 'h100-0x8'"):
        pjit_configs.get("h100-0x8")


def test_cpu_presets_build_meshes_and_mismatch_names_both():
    lay = pjit_configs.load("cpu-8")
    assert lay.mesh.axis_names == pjit_configs.MESH_AXES
    assert dict(lay.mesh.shape) == {"dcn": 1, "data": 1, "fsdp": 2, "expert": 2, "tensor": 2}
    assert lay.batch_axes == ("fsdp", "expert") and lay.batch_shards == 4
    with pytest.raises(pjit_configs.PresetError) as e:
        pjit_configs.load("v5p-1024")
    msg = str(e.value)
    assert "'v5p-1024' needs 512 devices" in msg and "fsdp 2 x expert 256" in msg
    assert "but 8 are available" in msg and "cpu" in msg
    with pytest.raises(pjit_configs.PresetError, match="needs 8 devices.*but 4 are available"
                       ".*xla_force_host_platform_device_count=8"):
        pjit_configs.load("cpu-8", devices=jax.devices()[:4])


def test_conflicting_rules_raise_naming_both():
    with pytest.raises(RulesError) as e:
        pjit_configs.MeshPreset("bad", SLICE + ((A.EMBED, ("tensor",)),), fsdp=2)
    msg = str(e.value)
    assert "mesh preset 'bad'" in msg and "conflicting rules for 'embed'" in msg
    assert "'embed' -> ('fsdp', 'expert')" in msg and "'embed' -> ('tensor',)" in msg
    with pytest.raises(RulesError, match=r"rule 'mlp' -> \('model',\) names mesh axis 'model'"):
        pjit_configs.MeshPreset("bad2", R.override(SLICE, [(A.MLP, ("model",))]))
    with pytest.raises(RulesError, match="logical axis 'hidden'"):
        pjit_configs.MeshPreset("bad3", SLICE + (("hidden", ()),))
    with pytest.raises(RulesError, match="repeats a mesh axis"):
        pjit_configs.MeshPreset("bad4", R.override(SLICE, [(A.MLP, ("tensor", "tensor"))]))
    with pytest.raises(pjit_configs.PresetError, match="ep='ring'"):
        pjit_configs.MeshPreset("bad5", SLICE, ep="ring")
    # repeating a rule verbatim is fine (presets extend rule sets)
    pjit_configs.MeshPreset("ok", SLICE + ((A.MLP, ("tensor",)),))


def test_spec_resolution_first_dim_wins_and_uneven_dims_replicate():
    table = {r[0]: r for r in CLUSTER}
    sizes = {"dcn": 4, "data": 1, "fsdp": 2, "expert": 8, "tensor": 1}
    # experts take (dcn, expert); the embed dim then keeps fsdp only
    assert spec_for((A.LAYERS, A.EXPERT, A.EMBED, A.EXPERT_MLP), (3, 64, 16, 8), table,
                    sizes) == P(None, ("dcn", "expert"), "fsdp")
    # 12 rows do not split 64 ways: axes are dropped from the end until they divide (4 = dcn)
    assert spec_for((A.EMBED, A.MLP), (12, 8), table, sizes) == P("dcn")
    assert spec_for((None, A.NORM), (5, 7), table, sizes) == P()
    with pytest.raises(RulesError, match="w_x: no rule for logical axis 'act_foo'"):
        spec_for(("act_foo",), (4,), table, sizes, where="w_x")
    with pytest.raises(RulesError, match="2 logical axes"):
        spec_for((A.EMBED, A.MLP), (4,), table, sizes)


@pytest.mark.parametrize("name", golden.preset_names())
def test_golden_partition_specs(name):
    d = golden.diff(name)
    assert not d, (f"PartitionSpecs of preset {name!r} changed; if intended, regenerate with "
                   f"`python -m pjit_configs.golden` and review the diff:\n{d}")


def test_no_stale_golden_files():
    import os

    on_disk = {f[:-4] for f in os.listdir(golden.GOLDEN_DIR) if f.endswith(".txt")}
    assert on_disk == set(golden.preset_names())


def test_ep_scope_from_preset_and_constrain():
    from jaxmoe.parallel.context import current_ep

    lay = pjit_configs.load("cpu-8")
    ep = lay.ep
    assert (ep.expert_axis, ep.token_axes, ep.variant) == ("expert", ("fsdp", "expert"),
                                                           "allgather")
    two = pjit_configs.load("cpu-2x4").ep
    assert two.expert_axis == ("dcn", "expert") and two.token_axes == ("dcn", "fsdp", "expert")
    assert pjit_configs.load("cpu-8-dp").ep is None  # no expert axis: GSPMD only
    assert pjit_configs.load("cpu-8", ep="none").ep is None
    assert pjit_configs.load("cpu-8", ep="a2a_fixed").ep.variant == "a2a_fixed"
    x = jax.numpy.ones((8, 4, 6))
    logical = (A.ACT_BATCH, A.ACT_SEQ, A.ACT_EMBED)
    assert constrain(x, logical) is x  # no layout: a no-op
    with lay.scope():
        assert current_ep() is ep
        y = jax.jit(lambda v: constrain(v, logical) * 2)(x)
    assert current_ep() is None
    assert y.sharding.spec == P(("fsdp", "expert"))


def test_trainer_mesh_flag_errors_name_preset_and_devices():
    from jaxmoe.train import trainer
    from jaxmoe.train.config import TrainConfigError
    from jaxmoe.train.flags import parse_args

    with pytest.raises(TrainConfigError, match="unknown mesh preset.*cpu-8"):
        parse_args(["--config", "tiny-debug", "--mesh.name", "tpu-9000"])
    with pytest.raises(TrainConfigError, match="--mesh.ep='ring'"):
        parse_args(["--config", "tiny-debug", "--mesh.name", "cpu-8", "--mesh.ep", "ring"])
    with pytest.raises(TrainConfigError, match="--mesh.data=8: sizes the 'auto'/'data' mesh"):
        parse_args(["--config", "tiny-debug", "--mesh.name", "cpu-8", "--mesh.data", "8"])
    cfg = parse_args(["--config", "tiny-debug", "--mesh.name", "h100-32x8"])
    with pytest.raises(TrainConfigError, match=r"--mesh.name='h100-32x8'.*needs 256 devices.*"
                                               r"but 8 are available"):
        trainer.prepare(cfg)
    cfg = parse_args(["--config", "tiny-debug", "--mesh.name", "cpu-8", "--data.batch_size", "6"])
    with pytest.raises(TrainConfigError, match="do not divide over 4 data shards"):
        trainer.prepare(cfg)
