"""Staged MoE training (jaxmoe/train/staged.py): during warm-up the router (weight and selection
bias) stays bitwise unchanged while the experts train; it trains from the joint phase on; the
sparsify phase adds the router-entropy term; the phase is a metric and shows in the progress line."""

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxmoe.train import staged, trainer
from jaxmoe.train.config import StageSection, TrainConfigError
from jaxmoe.train.runs import get_run
from jaxmoe.train.flags import apply_overrides
from jaxmoe.train.metrics import progress_line
from jaxmoe.train.optim import make_optimizer
from jaxmoe.train.step import StepFns

STEPS = 10  # warm-up steps 0-1, joint 2-6, sparsify 7-9


def test_phases_and_validation():
    st = StageSection(enabled=True, warmup=0.2, joint=0.5)
    assert staged.boundaries(st, STEPS) == (2, 7)
    assert [int(staged.phase_of(s, st, STEPS)) for s in range(STEPS)] == [0] * 2 + [1] * 5 + [2] * 3
    assert "phase warmup" in progress_line({"step": 1, "loss": 1.0, "lr": 0.1, "grad_norm": 1.0,
                                            "phase": 0}, STEPS)
    cfg = get_run("tiny-debug")
    with pytest.raises(TrainConfigError, match="stage.joint"):
        apply_overrides(cfg, [("stage.enabled", "true"), ("stage.joint", "0.95")]).validate()
    with pytest.raises(TrainConfigError, match="optim.clip_norm"):
        apply_overrides(cfg, [("stage.enabled", "true"), ("optim.clip_norm", "0")]).validate()


def router_and_experts(state):
    flat = {".".join(str(getattr(k, "key", k)) for k in p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(
                {"params": state["params"], "biases": state["biases"]}))[0]}
    router = {k: v for k, v in flat.items() if ".router." in k}
    experts = {k: v for k, v in flat.items() if "_EDF" in k or "_EFD" in k}
    assert any("w_DE" in k for k in router) and any("bias_E" in k for k in router) and experts
    return router, experts


def test_warmup_freezes_the_router_bitwise_while_experts_train():
    cfg = get_run("tiny-debug")
    cfg = cfg.replace(steps=STEPS, stage=StageSection(enabled=True, warmup=0.2, joint=0.5,
                                                      sparsity_weight=0.05),
                      optim=dataclasses.replace(cfg.optim, warmup_steps=0),
                      loss=dataclasses.replace(cfg.loss, mtp_weight=0.0))
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    plan = trainer.Plan(cfg, trainer.resolve_model_config(cfg), mesh, None, None)
    tx, lr = make_optimizer(cfg.optim, cfg.steps, cfg.stage)
    graphdef, state = trainer.init_state(plan, tx, NamedSharding(mesh, P()))
    fns = StepFns(graphdef, plan.mcfg, cfg.loss, tx, lr, cfg.steps, stage=cfg.stage)
    step = jax.jit(fns.train_step)
    rng = np.random.RandomState(0)
    r0, e0 = router_and_experts(state)
    ms = []
    for s in range(STEPS):
        tok = rng.randint(0, 256, (1, 8, 33)).astype(np.int32)
        batch = {"tokens": tok, "segments": np.ones_like(tok),
                 "positions": np.broadcast_to(np.arange(33, dtype=np.int32), tok.shape).copy()}
        state, m = step(state, batch)
        ms.append(jax.device_get(m))
        if s == 1:  # end of warm-up
            r1, e1 = router_and_experts(state)
    for k in r0:
        np.testing.assert_array_equal(r1[k], r0[k], err_msg=k)  # bitwise unchanged
    assert all(not np.array_equal(e1[k], e0[k]) for k in e0)
    r2, _ = router_and_experts(state)
    main = [k for k in r1 if ".moe_layers." in k]  # (the MTP router: no MTP loss in this run)
    assert len(main) == 2 and all(not np.array_equal(r2[k], r1[k]) for k in main)  # trains now
    assert [int(m["phase"]) for m in ms] == [0] * 2 + [1] * 5 + [2] * 3
    for m in ms:  # objective = CE + balance + (sparsify only) weight x router entropy
        extra = float(m["objective"]) - float(m["loss"]) - float(m["balance_loss"])
        want = 0.05 * float(m["router_entropy"]) if int(m["phase"]) == 2 else 0.0
        assert abs(extra - want) < 1e-5, (int(m["phase"]), extra, want)
    assert float(ms[-1]["router_entropy"]) > 0
