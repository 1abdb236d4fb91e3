"""The whole tiny model (dense + MoE layer + MTP) under every CPU-runnable mesh preset gives the
logits, loss and loss gradients of the unsharded model; the trainer's state (parameters AND
AdamW moments) is laid out by the preset's rules."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import pjit_configs
import shard_util as U

CPU_PRESETS = ["cpu-8", "cpu-8-dp", "cpu-2x4"]


@pytest.fixture(scope="module")
def reference():
    cfg = U.tiny_cfg()
    graphdef, params, rest = U.host_parts(cfg)
    tok = U.tokens(cfg.vocab_size)
    one = jax.devices()[0]
    put = lambda t: jax.device_put(t, one)  # noqa: E731
    (loss, logits), grads = U.make_step(graphdef)(put(params), put(rest), put(tok))
    return cfg, graphdef, params, rest, tok, (float(loss), np.asarray(logits), U.flat(grads))


@pytest.mark.parametrize("name", CPU_PRESETS)
def test_sharded_forward_backward_equals_unsharded(name, reference):
    cfg, graphdef, params, rest, tok, (loss0, logits0, grads0) = reference
    layout = pjit_configs.load(name)
    psh = layout.shardings(params)
    sparams = jax.device_put(params, psh)
    srest = jax.device_put(rest, layout.replicated)
    stok = jax.device_put(tok, layout.batch_sharding())
    # the layout really shards: experts over the expert axes, batch rows over the batch axes
    w = sparams["moe_layers"]["ffn"]["w_up_EDF"].get_value()
    if layout.axis_sizes["expert"] > 1:
        assert w.sharding.spec[1] in ("expert", ("dcn", "expert")), w.sharding.spec
        assert w.addressable_shards[0].data.shape[1] < cfg.n_routed_experts
    assert stok.addressable_shards[0].data.shape[0] == U.B // layout.batch_shards
    with layout.scope():  # the preset's expert-parallel variant, where it has one
        (loss, logits), grads = U.make_step(graphdef, out_shardings=((None, None), psh))(
            sparams, srest, stok)
    g = grads["moe_layers"]["ffn"]["w_up_EDF"].get_value()
    assert g.sharding.spec == w.sharding.spec  # gradients come back laid out like the params
    np.testing.assert_allclose(float(loss), loss0, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(logits), logits0, rtol=1e-5, atol=1e-6)
    grads = U.flat(grads)
    assert grads.keys() == grads0.keys()
    for k in grads0:
        scale = max(np.abs(grads0[k]).max(), 1e-6)
        err = np.abs(grads[k] - grads0[k]).max() / scale
        assert err < 1e-5, (name, k, err)


def test_trainer_state_is_sharded_by_the_preset(tmp_path):
    """--mesh.name cpu-8: init_state lays parameters and both AdamW moments out by the rules
    (FSDP x EP x TP), with the same values as the replicated init; the batch is split over the
    preset's batch axes."""
    from jaxmoe.train import trainer
    from jaxmoe.train.flags import parse_args
    from jaxmoe.train.optim import make_optimizer

    cfg = parse_args(["--config", "tiny-debug", "--mesh.name", "cpu-8",
                      "--workdir", str(tmp_path)])
    plan = trainer.prepare(cfg)
    assert plan.layout.name == "cpu-8" and plan.layout.batch_shards == 4
    assert plan.layout.ep is not None and plan.layout.ep.variant == "allgather"
    tx, _ = make_optimizer(cfg.optim, cfg.steps)
    _, state = trainer.init_state(plan, tx)
    _, rep = trainer.init_state(plan, tx, plan.layout.replicated)
    up = ("moe_layers", "ffn", "w_up_EDF")
    adam = state["opt"][1][0]
    for tree in (state["params"], adam.mu, adam.nu):
        v = tree
        for k in up:
            v = v[k]
        assert v.get_value().sharding.spec == P(None, "expert", "fsdp", "tensor")
    emb = state["params"]["embed_VD"].get_value()
    assert emb.sharding.spec == P("tensor", ("fsdp", "expert"))
    assert emb.addressable_shards[0].data.shape == (cfg_vocab(plan) // 2, 64 // 4)
    for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(state["params"])),
                    jax.tree.leaves(nnx.to_pure_dict(rep["params"]))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert state["step"].sharding.spec == P()
    assert trainer.DATA_AXIS in plan.mesh.axis_names


def cfg_vocab(plan) -> int:
    return plan.mcfg.vocab_size


def test_activations_are_pinned_by_the_rules_under_a_layout(reference, monkeypatch):
    """Under `Layout.scope()` the model pins the residual stream after every sub-layer and MLA's
    per-head q/k/v/output and the MoE's flattened tokens by the act_* rules (cpu-8: batch rows over fsdp x expert, heads over
    tensor), and the lowered program carries those constraints; without a layout there are none."""
    from jaxmoe.layers import block, mla, moe
    from jaxmoe.parallel import sharding

    cfg, graphdef, params, rest, tok, _ = reference
    layout = pjit_configs.load("cpu-8")
    seen = []

    def spy(x, logical):
        if sharding._ACTIVE.get() is not None:
            seen.append(layout.spec(logical, x.shape))
        return sharding.constrain(x, logical)

    for module in (block, mla, moe):
        monkeypatch.setattr(module, "constrain", spy)
    args = (params, rest, tok)
    plain = U.make_step(graphdef).lower(*args).as_text()
    with layout.scope():  # a fresh jit: a traced program does not see a later scope
        pinned = U.make_step(graphdef).lower(*args).as_text()
    # (specs drop trailing unsplit dimensions)
    residual, per_head = P(("fsdp", "expert")), P(("fsdp", "expert"), None, "tensor")
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    assert seen.count(per_head) == 4 * layers, seen  # q, k, v and the attention output
    moe_layers = cfg.num_moe_layers + sum(cfg.is_moe_layer(cfg.num_hidden_layers + i)
                                          for i in range(cfg.num_nextn_predict_layers))
    assert 0 < moe_layers < layers and seen.count(residual) == 2 * layers + moe_layers, seen  # + tokens
    assert len(seen) == 6 * layers + moe_layers
    assert plain.count("sdy.sharding_constraint") == 0
    assert pinned.count("sdy.sharding_constraint") >= len(seen)
