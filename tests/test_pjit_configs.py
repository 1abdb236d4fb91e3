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


# DeepSeek-V3 671B tensors (config: 58 MoE layers, 256 experts, D 7168, moe F 2048, V 129280,
# Q 1536, C 512, 128 heads, J 192, I 256, G 128): shape and logical axes as the names say.
V3 = {
    "moe_layers.ffn.w_gate_EDF": ((58, 256, 7168, 2048),
                                  (A.LAYERS, A.EXPERT, A.EMBED, A.EXPERT_MLP)),
    "moe_layers.ffn.w_down_EFD": ((58, 256, 2048, 7168),
                                  (A.LAYERS, A.EXPERT, A.EXPERT_MLP, A.EMBED)),
    "embed_VD": ((129280, 7168), (A.VOCAB, A.EMBED)),
    "lm_head_DV": ((7168, 129280), (A.EMBED, A.VOCAB)),
    "moe_layers.attn.wq_b_QNJ": ((58, 1536, 128, 192), (A.LAYERS, A.Q_LORA, A.HEADS, A.HEAD_DIM)),
    "moe_layers.attn.wkv_b_CNI": ((58, 512, 128, 256), (A.LAYERS, A.KV_LORA, A.HEADS, A.HEAD_DIM)),
    "moe_layers.attn.wo_NGD": ((58, 128, 128, 7168), (A.LAYERS, A.HEADS, A.HEAD_DIM, A.EMBED)),
}


def hand_specs(dense, experts, expert_embed):
    """The specs of V3's tensors, written out from the presets.py rules: `embed` and the q/kv
    LoRA ranks take `dense` (FSDP), the expert axis `experts`, and an expert stack's embed only
    what of `dense` the expert axis left (`expert_embed`); layers and head_dim are never split,
    heads / vocab / expert_mlp go to `tensor`, which is 1 on every large preset (so dropped)."""
    return {
        "moe_layers.ffn.w_gate_EDF": P(None, experts, expert_embed),
        "moe_layers.ffn.w_down_EFD": P(None, experts, None, expert_embed),
        "embed_VD": P(None, dense),
        "lm_head_DV": P(dense),
        "moe_layers.attn.wq_b_QNJ": P(None, dense),
        "moe_layers.attn.wkv_b_CNI": P(None, dense),
        "moe_layers.attn.wo_NGD": P(None, None, None, dense),
    }


# By hand, for each large preset. Every count divides: 7168, 1536 and 512 by the FSDP product
# (128, 512, 256, 8, 256), 256 experts by the expert axis (64, 256, 16, 8, 256), 7168 by fsdp.
# TPU slices (SLICE): embed -> (fsdp, expert); experts -> expert, so their embed keeps fsdp;
# dcn (v6e-256x2) is batch-only. One GPU node: fsdp is 1, so embed keeps expert alone and an
# expert stack's embed nothing. GPU clusters (CLUSTER): embed -> (dcn, fsdp, expert) = (dcn,
# expert), experts -> (dcn, expert), which leaves an expert stack's embed nothing.
TPU = hand_specs(("fsdp", "expert"), "expert", "fsdp")
GPU_NODE = hand_specs("expert", "expert", None)
GPU_CLUSTER = hand_specs(("dcn", "expert"), ("dcn", "expert"), None)
HAND = {"v5p-256": TPU, "v5p-1024": TPU, "v6e-256": TPU, "v6e-256x2": TPU,
        "h100-8": GPU_NODE, "h200-8": GPU_NODE, "h100-32x8": GPU_CLUSTER,
        "h200-32x8": GPU_CLUSTER}


def _trim(spec) -> tuple:
    """A PartitionSpec as a tuple without trailing Nones (P(None, 'x') == P(None, 'x', None))."""
    t = tuple(spec)
    while t and t[-1] is None:
        t = t[:-1]
    return t


def test_large_presets_shard_v3_as_derived_by_hand():
    from flax import nnx
    from jax.sharding import AbstractMesh

    from jaxmoe.parallel.sharding import Layout, logical_axes_of, path_str

    assert set(HAND) == {n for n in golden.preset_names() if not n.startswith("cpu-")}
    state = golden.abstract_params("deepseek_v3_671b")
    flat = {path_str(p): v for p, v in nnx.to_flat_state(state)}
    for key, (shape, logical) in V3.items():
        assert (tuple(flat[key].get_value().shape), logical_axes_of(flat[key])) == (shape, logical)
    for name, want in HAND.items():
        p = pjit_configs.get(name)
        # the trainer's path (Layout.specs) on an abstract mesh of the preset's shape
        specs = Layout(AbstractMesh(p.shape, pjit_configs.MESH_AXES), p.rules).specs(state)
        got = {path_str(k): v.get_value() for k, v in nnx.to_flat_state(specs)}
        for key, spec in want.items():
            assert _trim(got[key]) == _trim(spec), (name, key, got[key], spec)
