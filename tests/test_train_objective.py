"""The training objective's terms against formulas written from dsv3-spec §5.2 and §11, in numpy:
the MTP term (lambda / D * sum_k CE_k, targets k+1 ahead, cut at document boundaries), the MTP
depths sharing the main embedding and output head, the sequence-wise balance term, the lambda and
gamma schedules and the report's optimizer and loss defaults."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jaxmoe
from parity_util import FAST_COMPILE
from jaxmoe.layers.moe import routing_stats
from jaxmoe.layers.router import route
from jaxmoe.train import trainer
from jaxmoe.train.config import LossSection, OptimSection
from jaxmoe.train.flags import apply_overrides
from jaxmoe.train.optim import make_optimizer
from jaxmoe.train.runs import get_run
from jaxmoe.train.step import StepFns, doc_mask, tie_mtp_embeddings

T1 = 17  # T + 1 tokens per row; two documents per row: tokens 0..8 and 9..16


def _setup(**loss):
    cfg = apply_overrides(get_run("tiny-debug"), [
        ("model.overrides", "num_hidden_layers=2,moe_impl=dense,num_nextn_predict_layers=2")])
    cfg = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, **loss)).validate()
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    plan = trainer.Plan(cfg, trainer.resolve_model_config(cfg), mesh, None, None)
    tx, lr = make_optimizer(cfg.optim, cfg.steps)
    graphdef, state = trainer.init_state(plan, tx, NamedSharding(mesh, P()))
    return cfg, plan.mcfg, StepFns(graphdef, plan.mcfg, cfg.loss, tx, lr, cfg.steps), state


def _batch(vocab: int) -> dict:
    tok = np.random.RandomState(0).randint(0, vocab, (8, T1)).astype(np.int32)
    seg = np.where(np.arange(T1) < 9, 1, 2).astype(np.int32)[None].repeat(8, 0)
    pos = np.where(np.arange(T1) < 9, np.arange(T1), np.arange(T1) - 9).astype(np.int32)
    return {"tokens": tok, "segments": seg, "positions": np.broadcast_to(pos, tok.shape).copy()}


def _ce_ahead(logits: np.ndarray, tok: np.ndarray, seg: np.ndarray, k: int) -> float:
    """Mean CE of row i predicting token i+k+1, over targets in row i's own document."""
    lg = logits.astype(np.float64)  # [b, T-k, V]
    n = lg.shape[1]
    lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    gold = np.take_along_axis(lg, tok[:, k + 1:k + 1 + n, None], -1)[..., 0]
    valid = seg[:, :n] == seg[:, k + 1:k + 1 + n]
    return float(((lse - gold) * valid).sum() / valid.sum())


def test_mtp_term_is_lambda_over_depths_times_the_sum_of_depth_ces():
    """objective - CE = lambda / D * sum_k CE_k (D = 2 depths, lambda 0.3 before the switch),
    each CE_k over targets k+1 ahead within the document, from the model's MTP logits."""
    cfg, mcfg, fns, state = _setup(balance_alpha=0.0)
    assert fns.use_mtp and mcfg.num_nextn_predict_layers == 2
    mb = _batch(mcfg.vocab_size)
    denom = fns.denominators(jnp.asarray(mb["segments"])[None])
    parts = (state["params"], state["biases"], fns.fixed_parts(state))
    obj, aux = jax.jit(fns.micro_loss, compiler_options=FAST_COMPILE)(*parts, mb, denom, state["step"], 1, state["rng"])

    @jax.jit
    def logits(params):  # the main and MTP logits of the tied model
        model = fns.model_of(tie_mtp_embeddings(params), *parts[1:])
        inp, pos = mb["tokens"][:, :-1], mb["positions"][:, :-1]
        mask = doc_mask(jnp.asarray(mb["segments"][:, :-1]), pos)
        out = model.forward(inp, pos, mask=mask)
        return out.logits, model.mtp_forward(out.hidden, inp, pos, mask)[0]

    main, lgs = logits(parts[0])
    ce = _ce_ahead(np.asarray(main), mb["tokens"], mb["segments"], 0)
    ces = [_ce_ahead(np.asarray(lg), mb["tokens"], mb["segments"], k)
           for k, lg in enumerate(lgs, start=1)]
    assert float(aux["ce"]) == pytest.approx(ce, rel=1e-5)
    assert float(obj) - float(aux["ce"]) == pytest.approx(0.3 / 2 * sum(ces), rel=1e-4)
    assert min(ces) > 0 and abs(ces[0] - ces[1]) > 1e-3  # two distinct depth terms


def test_mtp_depths_share_the_main_embedding_and_head():
    """dsv3-spec §5.2: with shared embeddings (the default) the MTP loss's gradient reaches the
    main embedding and head - exactly the untied gradient of the main arrays plus that of the
    depths' copies, at equal values - and none reaches the copies; after an update the copies equal
    the main arrays. --loss.mtp_shared_embeddings false trains the copies apart (their own
    gradient, above)."""
    cfg, mcfg, fns, state = _setup()
    untied = StepFns(fns.graphdef, mcfg, dataclasses.replace(cfg.loss, mtp_shared_embeddings=False),
                     fns.tx, fns.lr_fn, fns.total_steps)
    assert fns.tie_mtp and not untied.tie_mtp
    mb = _batch(mcfg.vocab_size)
    denom = fns.denominators(jnp.asarray(mb["segments"])[None])
    equal = tie_mtp_embeddings(state["params"])  # copies = main: both objectives agree here

    def grads(f):
        g = jax.jit(jax.grad(lambda p: f.micro_loss(p, state["biases"], f.fixed_parts(state), mb,
                                                    denom, state["step"], 1, state["rng"])[0]),
                    compiler_options=FAST_COMPILE)
        return jax.tree.map(np.asarray, g(equal))

    gt, gu = grads(fns), grads(untied)
    for main, copy in (("embed_VD", "embed_VD"), ("lm_head_DV", "head_DV")):
        want = gu[main].get_value() + sum(gu["mtp"][k][copy].get_value() for k in (0, 1))
        np.testing.assert_allclose(gt[main].get_value(), want, rtol=1e-5, atol=1e-9)
        assert np.abs(gu["mtp"][0][copy].get_value()).max() > 0  # the MTP term does reach it
        for k in (0, 1):
            assert not np.any(gt["mtp"][k][copy].get_value())
    new, _ = jax.jit(fns.train_step, compiler_options=FAST_COMPILE)(state, {k: v[None] for k, v in mb.items()})
    p = new["params"]
    for k in (0, 1):
        np.testing.assert_array_equal(p["mtp"][k]["embed_VD"].get_value(), p["embed_VD"].get_value())
        np.testing.assert_array_equal(p["mtp"][k]["head_DV"].get_value(), p["lm_head_DV"].get_value())


def test_sequence_balance_term_is_the_spec_formula():
    """L_bal = mean over sequences of sum_i f_i P_i, f_i = E / (K T) * (picks of expert i in the
    sequence), P_i = mean over its tokens of s_i / sum_j s_j (unbiased sigmoid scores); T != K and
    B > 1, so a swapped normaliser or a batch-wide mean would fail."""
    cfg = jaxmoe.tiny(n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2)
    B, T, E, K = 3, 7, 8, 2
    rng = np.random.default_rng(0)
    logits = (2 * rng.standard_normal((B * T, E))).astype(np.float32)
    bias = (0.3 * rng.standard_normal(E)).astype(np.float32)
    r = route(jnp.asarray(logits), jnp.asarray(bias), cfg)
    got = float(routing_stats(r, B, T, cfg)["seq_balance"])
    s = 1 / (1 + np.exp(-logits.astype(np.float64)))
    ids = np.asarray(r.experts).reshape(B, T, K)
    want = 0.0
    for b in range(B):
        f = E / (K * T) * np.bincount(ids[b].ravel(), minlength=E)
        p = (s[b * T:(b + 1) * T] / s[b * T:(b + 1) * T].sum(-1, keepdims=True)).mean(0)
        want += (f * p).sum() / B
    assert got == pytest.approx(want, rel=1e-6)
    # not the batch-wide version: the formula is per sequence
    f_all = E / (K * B * T) * np.bincount(ids.ravel(), minlength=E)
    assert abs((f_all * (s / s.sum(-1, keepdims=True)).mean(0)).sum() - want) > 1e-4


def test_schedules_switch_at_their_fractions_and_defaults_are_the_reports():
    """lambda 0.3 -> 0.1 at 10/14.8 of the steps; gamma 0.001 -> 0 at 14.3/14.8 (dsv3-spec §11);
    AdamW beta 0.9/0.95, weight decay 0.1, clipping 1.0, balance alpha 1e-4."""
    loss, optim = LossSection(), OptimSection()
    assert (loss.mtp_weight, loss.mtp_weight_late, loss.balance_alpha, loss.bias_update_speed) == \
        (0.3, 0.1, 1e-4, 1e-3)
    assert loss.mtp_switch == 10.0 / 14.8 and loss.bias_update_stop == 14.3 / 14.8
    assert loss.mtp_shared_embeddings
    assert (optim.b1, optim.b2, optim.weight_decay, optim.clip_norm) == (0.9, 0.95, 0.1, 1.0)
    total = 1480
    fns = StepFns(None, jaxmoe.tiny(), loss, None, None, total)
    assert float(fns.mtp_lambda(999)) == pytest.approx(0.3)   # 1000 = 10/14.8 of 1480
    assert float(fns.mtp_lambda(1000)) == pytest.approx(0.1)
    assert float(fns.gamma(1429)) == pytest.approx(1e-3)      # 1430 = 14.3/14.8 of 1480
    assert float(fns.gamma(1430)) == 0.0
