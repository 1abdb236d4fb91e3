"""jaxmoe.train units: packing and masks, the data order, the sources, the optimizer, the MTP
path with document masking, and the aux-loss-free bias update (in-process, 8 CPU devices)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxmoe
from jaxmoe.train import batches as B
from jaxmoe.train import data as D
from jaxmoe.train.config import DataSection, OptimSection
from jaxmoe.train.runs import get_run
from jaxmoe.train.flags import apply_overrides
from jaxmoe.train.optim import decays, make_optimizer, schedule
from jaxmoe.train.step import bias_update, doc_mask, target_mask, tie_mtp_embeddings


def host_model(cfg, seed=0):
    """A DeepseekV3 with the trainer's numpy init: no init program to compile."""
    from jaxmoe.train.state import host_init

    graphdef, state = nnx.split(nnx.eval_shape(lambda: jaxmoe.DeepseekV3(cfg, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, host_init(state, cfg, seed))


def corpus_of(docs, vocab=50):
    return D._from_docs([np.asarray(d, np.int32) for d in docs], vocab, "t", np.int32)


def test_pack_rows_segments_positions_masks():
    c = corpus_of([[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11]])
    b = B.pack_rows(c, np.array([0, 1]), seq_len=4)  # rows: stream[0:5], stream[4:9]
    np.testing.assert_array_equal(b["tokens"], [[1, 2, 3, 4, 5], [5, 6, 7, 8, 9]])
    np.testing.assert_array_equal(b["segments"], [[1, 1, 1, 2, 2], [1, 2, 2, 2, 2]])
    np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]])
    # target i+1 counts only inside token i's document
    np.testing.assert_array_equal(target_mask(jnp.asarray(b["segments"])),
                                  [[1, 1, 0, 1], [0, 1, 1, 1]])
    np.testing.assert_array_equal(target_mask(jnp.asarray(b["segments"]), 1), [[1, 0, 0], [0, 1, 1]])
    m = np.asarray(doc_mask(jnp.asarray(b["segments"][:, :-1]), None))[:, 0]
    want0 = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 1]], bool)
    np.testing.assert_array_equal(m[0], want0)
    assert not m[1][1:, 0].any() and m[1][3, 1:].all()


def test_sampler_is_deterministic_and_resumable():
    s = B.Sampler(10, seed=3)
    whole = s.rows(0, 25)
    parts = np.concatenate([B.Sampler(10, 3).rows(0, 7), B.Sampler(10, 3).rows(7, 18)])
    np.testing.assert_array_equal(whole, parts)
    for e in range(2):  # every epoch is a permutation
        assert sorted(whole[10 * e:10 * e + 10]) == list(range(10))
    assert not np.array_equal(whole[:10], whole[10:20])
    assert not np.array_equal(whole[:10], B.Sampler(10, 4).rows(0, 10))


def test_pack_rows_without_document_masking_is_one_causal_sequence():
    """--data.doc_masking false (the report's pretraining packs without cross-sample masking): the
    same tokens, one segment per row and positions 0..T, so the step's attention mask is plain
    causal and every next token is a target."""
    c = corpus_of([[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11]])
    a = B.pack_rows(c, np.array([0, 1]), seq_len=4)
    b = B.pack_rows(c, np.array([0, 1]), seq_len=4, doc_masking=False)
    np.testing.assert_array_equal(b["tokens"], a["tokens"])
    np.testing.assert_array_equal(b["segments"], np.ones((2, 5)))
    np.testing.assert_array_equal(b["positions"], [list(range(5))] * 2)
    m = np.asarray(doc_mask(jnp.asarray(b["segments"][:, :-1]), jnp.asarray(b["positions"][:, :-1])))
    np.testing.assert_array_equal(m[:, 0], np.broadcast_to(np.tril(np.ones((4, 4), bool)), (2, 4, 4)))
    np.testing.assert_array_equal(np.asarray(target_mask(jnp.asarray(b["segments"]))), np.ones((2, 4)))
    assert not np.asarray(target_mask(jnp.asarray(a["segments"]))).all()  # masking drops some


def test_trainer_builds_its_loaders_with_doc_masking(tmp_path, monkeypatch):
    from jaxmoe.train import trainer

    seen = []

    class Built(Exception):
        pass

    def loader(corpus, **kw):
        seen.append(kw["doc_masking"])
        raise Built

    def step_fns(*a, **kw):
        seen.append(("steps", kw["doc_masking"]))
        return real(*a, **kw)

    real = trainer.StepFns
    monkeypatch.setattr(B, "Loader", loader)
    monkeypatch.setattr(trainer, "StepFns", step_fns)
    cfg = apply_overrides(get_run("tiny-debug"), [
        ("workdir", str(tmp_path / "w")), ("data.doc_masking", "false"),
        ("data.max_bytes", "200000")]).validate()
    with pytest.raises(Built):
        trainer.run(cfg)
    assert seen == [("steps", False), False]


def test_without_document_masking_the_step_uses_the_models_causal_mask():
    """StepFns(doc_masking=False) passes no [B, 1, T, T] mask (the model's causal one is the
    same for one segment per row): the same loss as the explicit mask on such a batch."""
    from jax.sharding import Mesh

    from jaxmoe.train import trainer
    from jaxmoe.train.step import StepFns

    cfg = apply_overrides(get_run("tiny-debug"), [("loss.mtp_weight", "0")]).validate()
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    plan = trainer.Plan(cfg, trainer.resolve_model_config(cfg), mesh, None, None)
    tx, lr = make_optimizer(cfg.optim, cfg.steps)
    graphdef, state = trainer.init_state(plan, tx, NamedSharding(mesh, P()))
    c = corpus_of([list(range(1, 30)), list(range(1, 40))])
    mb = B.pack_rows(c, np.array([0, 1, 2, 3]), seq_len=12, doc_masking=False)
    denom = jnp.asarray([float(4 * 12)])
    out = {}
    for on in (True, False):
        fns = StepFns(graphdef, plan.mcfg, cfg.loss, tx, lr, cfg.steps, doc_masking=on)
        args = (state["params"], state["biases"], fns.fixed_parts(state), mb, denom, state["step"])
        out[on] = jax.jit(fns.micro_loss)(*args)[0], jax.make_jaxpr(fns.micro_loss)(*args)
    assert float(out[False][0]) == pytest.approx(float(out[True][0]), rel=1e-6)
    square = "bool[4,1,12,12]"
    assert square in str(out[True][1]) and square not in str(out[False][1])


def test_global_batch_is_the_host_batch_on_every_shard():
    c = corpus_of([list(range(1, 40)), list(range(1, 30))])
    loader = B.Loader(c, seq_len=5, batch_size=16, grad_accum=2, seed=0)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    g = loader.global_batch(24, NamedSharding(mesh, P(None, "data")))
    h = loader.host_batch(24)
    for k in h:
        assert g[k].shape == (2, 8, 6)
        np.testing.assert_array_equal(np.asarray(g[k]), h[k])


def test_stdlib_corpus_is_bytes_with_held_out_files():
    train, ev = D.stdlib_corpora(0.05, max_bytes=300_000)
    assert train.byte_level and train.vocab == 256 and train.tokens.dtype == np.uint8
    assert 0 < len(train.tokens) <= 300_000 and len(ev.tokens) > 0
    assert train.doc_starts[0] == 0 and np.all(np.diff(train.doc_starts) > 0)
    assert D.stdlib_corpora(0.05, max_bytes=300_000)[0].fingerprint == train.fingerprint


def test_memmap_sources_split_documents_at_eos(tmp_path):
    toks = np.array([5, 6, 0, 7, 8, 9, 0, 3, 4, 4, 0, 2], np.uint16)
    toks.tofile(tmp_path / "a.bin")
    np.save(tmp_path / "a.npy", toks.astype(np.int32))
    for name in ("a.bin", "a.npy"):
        d = DataSection(source="memmap", path=str(tmp_path / name), eos_id=0, eval_fraction=0.25,
                        seq_len=3)
        train, ev = D.load_corpora(d, model_vocab=16)
        np.testing.assert_array_equal(train.tokens, toks[:9])
        np.testing.assert_array_equal(train.doc_starts, [0, 3, 7])
        assert len(ev.tokens) == 3
    with pytest.raises(D.TrainConfigError, match="token id 12"):
        B.pack_rows(D.memmap_corpus(np.array([1, 12, 3, 4]), -1, "x", 10), np.array([0]), 3)


def test_jsonl_source_with_a_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    texts = [f"document number {i} says hello world {i % 3}" for i in range(40)]
    tk = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<unk>", "</s>"]))
    tk.save(str(tmp_path / "tokenizer.json"))
    with open(tmp_path / "d.jsonl", "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    d = DataSection(source="jsonl", path=str(tmp_path / "d.jsonl"),
                    tokenizer=str(tmp_path / "tokenizer.json"), eval_fraction=0.2, seq_len=8)
    train, ev = D.load_corpora(d, model_vocab=64)
    eos = tk.token_to_id("</s>")
    assert len(ev.doc_starts) + len(train.doc_starts) == 40 and len(ev.doc_starts) > 0
    ends = np.flatnonzero(train.tokens == eos) + 1  # every document ends with </s>
    np.testing.assert_array_equal(train.doc_starts[1:], ends[:-1])
    first = tk.encode(texts[0], add_special_tokens=False).ids
    np.testing.assert_array_equal(train.tokens[:len(first)], first)


def test_weight_decay_mask_and_schedules():
    model = nnx.eval_shape(lambda: jaxmoe.DeepseekV3(jaxmoe.tiny(num_hidden_layers=2),
                                                     rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    flat = {".".join(str(getattr(k, "key", getattr(k, "name", k))) for k in p): decays(p)
            for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert not flat["final_norm.scale.value"] and not flat["moe_layers.attn.kv_norm.scale.value"]
    assert flat["moe_layers.ffn.w_gate_EDF.value"] and flat["embed_VD.value"]
    assert flat["moe_layers.ffn.router.w_DE.value"]
    o = OptimSection(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    cos = schedule(o, 100)
    assert float(cos(0)) == 0.0 and float(cos(10)) == pytest.approx(1.0)
    assert float(cos(100)) == pytest.approx(0.1)
    st = schedule(OptimSection(lr=1.0, warmup_steps=10, schedule="staged"), 1000)
    lrs = [float(st(s)) for s in (5, 100, 600, 900, 970, 995)]
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == lrs[2] == 1.0
    assert 0.1 < lrs[3] < 1.0 and lrs[4] == pytest.approx(0.1)
    assert lrs[5] == pytest.approx(7.3e-6 / 2.2e-4)
    tx, _ = make_optimizer(o, 100)
    jax.eval_shape(tx.init, params)  # the mask fits the nnx.State tree


def test_mtp_forward_with_causal_mask_is_the_models_mtp():
    cfg = jaxmoe.tiny(num_hidden_layers=2, moe_impl="dense")
    graphdef, state = nnx.split(host_model(cfg, 1))
    tok = jax.random.randint(jax.random.key(0), (2, 12), 0, 256)
    pos = jnp.broadcast_to(jnp.arange(12), tok.shape)
    seg2 = jnp.where(jnp.arange(12) < 6, 1, 2)[None].repeat(2, 0)

    @jax.jit
    def run(state):
        model = nnx.merge(graphdef, state)
        out = model.forward(tok, with_mtp=True)
        ours = model.mtp_forward(out.hidden, tok, pos, doc_mask(jnp.ones_like(tok), pos))
        split = model.mtp_forward(out.hidden, tok, pos, doc_mask(seg2, pos))[0]
        return out, ours, split

    out, (lg, aux), lg2 = run(state)
    np.testing.assert_allclose(lg[0], out.mtp_logits[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(aux[0]["counts"], out.mtp_aux[0]["counts"])
    # a document boundary changes only the rows after it
    np.testing.assert_allclose(lg2[0][:, :6], lg[0][:, :6], rtol=1e-5, atol=1e-5)
    assert not np.allclose(lg2[0][:, 6:], lg[0][:, 6:])


def test_bias_update_sign_step_recentred_and_gamma_zero():
    biases = nnx.State({"moe_layers": {"ffn": {"router": {"bias_E": jaxmoe.layers.params.RouterBias(
        jnp.zeros((2, 4)))}}}})
    counts = {("moe_layers", "ffn", "router", "bias_E"): jnp.array([[10., 2, 2, 2], [4, 4, 4, 4]])}
    out = bias_update(biases, counts, 0.1)
    b = np.asarray(out["moe_layers"]["ffn"]["router"]["bias_E"].get_value())
    # overloaded expert 0 down by gamma, the others up; recentred to mean 0; balanced row 0
    np.testing.assert_allclose(b[0], np.array([-0.1, 0.1, 0.1, 0.1]) - 0.05, atol=1e-7)
    np.testing.assert_allclose(b[1], 0.0)
    same = bias_update(biases, counts, 0.0)
    np.testing.assert_array_equal(same["moe_layers"]["ffn"]["router"]["bias_E"].get_value(), 0.0)


def test_bias_update_reduces_load_imbalance_of_a_skewed_router():
    """Routers pushed towards experts 0 and 1: the jitted train step's bias update (gamma 0.05,
    global counts over the 8-device batch) spreads the load; the expert weights stay fixed
    (lr 0) so only the bias acts. gamma 0 leaves the bias alone (use_bias off)."""
    from jaxmoe.train import trainer
    from jaxmoe.train.step import StepFns

    cfg = apply_overrides(get_run("tiny-debug"), [
        ("loss.mtp_weight", "0"), ("loss.bias_update_speed", "0.05"), ("optim.lr", "1e-12"),
        ("optim.warmup_steps", "0"), ("data.batch_size", "16")]).validate()
    plan = trainer.prepare(cfg)
    rep = NamedSharding(plan.mesh, P())
    tx, lr = make_optimizer(cfg.optim, cfg.steps)
    graphdef, state = trainer.init_state(plan, tx, rep)
    skew = jnp.array([0.3, 0.3, 0, 0, 0, 0, 0, 0]) - 0.075
    b = state["biases"]["moe_layers"]["ffn"]["router"]["bias_E"]
    b.set_value(jax.device_put(jnp.broadcast_to(skew, b.get_value().shape), rep))
    fns = StepFns(graphdef, plan.mcfg, cfg.loss, tx, lr, cfg.steps)
    assert not StepFns(graphdef, plan.mcfg, cfg.loss.__class__(bias_update_speed=0.0), tx, lr,
                       cfg.steps).use_bias
    step = jax.jit(fns.train_step)
    loader = B.Loader(plan.train, cfg.data.seq_len, 16, 1, 0)
    batch = loader.global_batch(0, NamedSharding(plan.mesh, P(None, "data")))
    imb = []
    for _ in range(8):
        state, m = step(state, batch)  # the same batch: only the bias changes the routing
        imb.append(float(m["load_max_over_mean"][0]))
    assert imb[0] > 2.5, imb  # experts 0/1 take most of the load
    assert imb[-1] < 0.75 * imb[0] and imb[-1] <= min(imb[:3]), imb
    bias = np.asarray(state["biases"]["moe_layers"]["ffn"]["router"]["bias_E"].get_value())
    assert abs(bias.mean()) < 1e-6 and bias[0, 0] < skew[0] - 0.1


def test_init_from_a_converted_checkpoint(tmp_path):
    """--model.init_from: the trainer's initial state holds the checkpoint's parameters and
    router biases; its architecture comes from the checkpoint, overrides on top."""
    from jaxmoe import orbax_io
    from jaxmoe.train import trainer

    cfg = jaxmoe.tiny(num_hidden_layers=2)
    model = host_model(cfg, seed=7)
    b = model.moe_layers.ffn.router.bias_E
    b.set_value(b.get_value() + jnp.arange(8.0) / 100)
    orbax_io.save_model(model, tmp_path / "ckpt")
    run = apply_overrides(get_run("tiny-debug"), [
        ("model.init_from", str(tmp_path / "ckpt")), ("model.overrides", "moe_impl=dense")])
    plan = trainer.prepare(run.validate())
    assert plan.mcfg.num_hidden_layers == 2 and plan.mcfg.moe_impl == "dense"
    tx, _ = make_optimizer(run.optim, run.steps)
    _, state = trainer.init_state(plan, tx, NamedSharding(plan.mesh, P()))
    want = nnx.state(model)
    np.testing.assert_array_equal(state["params"]["moe_layers"]["ffn"]["w_up_EDF"].get_value(),
                                  want["moe_layers"]["ffn"]["w_up_EDF"].get_value())
    np.testing.assert_array_equal(state["biases"]["moe_layers"]["ffn"]["router"]["bias_E"].get_value(),
                                  b.get_value())
    assert int(state["step"]) == 0



def test_router_entropy_is_the_mean_over_routers():
    """Staged training's router_entropy (the metric, and the sparsify phase's loss term) is the
    mean over the routers - 2 MoE layers and the MTP depth here - of each one's mean per-token
    score entropy, so it stays in [0, ln E] at any depth; per microbatch divided by their count
    (the step sums microbatches). Checked against the values the model reports per router."""
    import dataclasses

    from jax.sharding import Mesh

    from jaxmoe.train import trainer
    from jaxmoe.train.config import StageSection
    from jaxmoe.train.step import StepFns

    cfg = apply_overrides(get_run("tiny-debug"),
                          [("model.overrides", "num_hidden_layers=3,moe_impl=dense")])
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    plan = trainer.Plan(cfg, trainer.resolve_model_config(cfg), mesh, None, None)
    mcfg = plan.mcfg
    assert mcfg.num_moe_layers == 2 and mcfg.num_nextn_predict_layers == 1
    stage = StageSection(enabled=True, warmup=0.0, joint=0.0, sparsity_weight=0.5)  # sparsify
    tx, lr = make_optimizer(cfg.optim, cfg.steps)
    graphdef, state = trainer.init_state(plan, tx, NamedSharding(mesh, P()))
    fns = StepFns(graphdef, mcfg, cfg.loss, tx, lr, cfg.steps, stage=stage)
    no_w = StepFns(graphdef, mcfg, cfg.loss, tx, lr, cfg.steps,
                   stage=dataclasses.replace(stage, sparsity_weight=0.0))
    assert fns.use_mtp and int(fns.phase(0)) == 2
    tok = np.random.RandomState(0).randint(0, 256, (8, 17)).astype(np.int32)  # [b, T+1]
    seg = np.where(np.arange(17) < 9, 1, 2).astype(np.int32)[None].repeat(8, 0)
    pos = np.where(np.arange(17) < 9, np.arange(17), np.arange(17) - 9).astype(np.int32)
    mb = {"tokens": tok, "segments": seg, "positions": np.broadcast_to(pos, tok.shape).copy()}

    @jax.jit
    def run(state):
        # (the MTP depth reads the main embedding, as the loss does)
        model = fns.model_of(tie_mtp_embeddings(state["params"]), state["biases"],
                             fns.fixed_parts(state))
        inp, p = mb["tokens"][:, :-1], mb["positions"][:, :-1]
        mask = doc_mask(jnp.asarray(mb["segments"][:, :-1]), p)
        out = model.forward(inp, p, mask=mask)
        mtp_aux = model.mtp_forward(out.hidden, inp, p, mask)[1]
        per_router = jnp.concatenate([out.aux["score_entropy"],
                                      jnp.stack([a["score_entropy"] for a in mtp_aux])])
        denom = fns.denominators(jnp.asarray(mb["segments"])[None])
        args = (state["params"], state["biases"], fns.fixed_parts(state), mb, denom,
                state["step"], 2, state["rng"])  # as one of 2 microbatches
        (ow, aux), (o0, _) = fns.micro_loss(*args), no_w.micro_loss(*args)
        return per_router, aux["router_entropy"], ow - o0

    per_router, ent, extra = jax.device_get(run(state))
    assert per_router.shape == (3,)  # routers: 2 MoE layers + 1 MTP depth
    got = 2 * float(ent)  # the step's metric sums its 2 microbatches
    assert 0.0 <= got <= np.log(mcfg.n_routed_experts), got
    assert got == pytest.approx(float(per_router.mean()), rel=1e-5)
    assert got < float(per_router.sum())  # (what it was: the sum over routers, > ln E here)
    assert float(extra) == pytest.approx(0.5 * float(ent), rel=1e-4)  # loss: weight x the same


def test_checkpoints_only_at_multiples_of_every_and_forced_steps(tmp_path):
    """The trainer offers every step to Checkpointer.save (force=True for the last step, a
    preemption, the end of --run_steps): only multiples of --ckpt.every and forced steps are
    written - not the first step Orbax's default policy saves into an empty folder - also after
    a resume, and with every=0 only forced ones."""
    from jaxmoe.train.checkpoint import Checkpointer, is_periodic

    assert [s for s in range(0, 13) if is_periodic(s, 5)] == [5, 10]
    assert not any(is_periodic(s, 0) for s in range(0, 13))
    state = {"w": np.arange(4, dtype=np.float32), "step": np.int32(0)}

    def run(directory, every, steps, force_at=()):
        ck = Checkpointer(str(directory), every, 10, False)
        started = [s for s in steps if ck.save(s, dict(state, step=np.int32(s)), {"s": s},
                                               force=s in force_at)]
        ck.wait()
        have = sorted(ck.mngr.all_steps())
        ck.close()
        return started, have

    assert run(tmp_path / "a", 5, range(1, 13), force_at=(12,)) == ([5, 10, 12], [5, 10, 12])
    # resumed at 12: the next periodic save is 15, then the forced last step 17
    assert run(tmp_path / "a", 5, range(13, 18), force_at=(17,)) == \
        ([15, 17], [5, 10, 12, 15, 17])
    # a 20-step run with every=100 (README: every K steps plus the last): only step 20
    assert run(tmp_path / "b", 100, range(1, 21), force_at=(20,)) == ([20], [20])
    assert run(tmp_path / "c", 0, range(1, 8), force_at=(3, 7)) == ([3, 7], [3, 7])
    ck = Checkpointer(str(tmp_path / "a"), 5, 10, False)
    restored, meta = ck.restore(17, jax.eval_shape(lambda: state))
    ck.close()
    assert int(restored["step"]) == 17 and meta == {"s": 17}


def test_adam_with_stored_moments_is_optax_adam_and_rounds_only_the_storage():
    """--optim.moments_dtype: with float32 storage the transform is optax's Adam; with bfloat16
    each step reads the stored moments, updates them in float32, computes the update from those
    float32 values and stores them rounded."""
    import optax

    from jaxmoe.train.optim import scale_by_adam_stored

    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((5, 7)), jnp.float32)}
    grads = [{"w": jnp.asarray(rng.standard_normal((5, 7)), jnp.float32)} for _ in range(3)]
    ref, same = optax.scale_by_adam(0.9, 0.95, 1e-8), scale_by_adam_stored(0.9, 0.95, 1e-8,
                                                                           jnp.float32)
    rs, ss = ref.init(params), same.init(params)
    for g in grads:
        (ur, rs), (us, ss) = ref.update(g, rs), same.update(g, ss)
        np.testing.assert_allclose(us["w"], ur["w"], rtol=1e-6)
    low = scale_by_adam_stored(0.9, 0.95, 1e-8, jnp.bfloat16)
    ls = low.init(params)
    for t, g in enumerate(grads, start=1):
        mu = 0.9 * ls.mu["w"].astype(jnp.float32) + 0.1 * g["w"]
        nu = 0.95 * ls.nu["w"].astype(jnp.float32) + 0.05 * g["w"] ** 2
        want = mu / (1 - 0.9 ** t) / (jnp.sqrt(nu / (1 - 0.95 ** t)) + 1e-8)
        u, ls = low.update(g, ls)
        assert ls.mu["w"].dtype == jnp.bfloat16 and ls.nu["w"].dtype == jnp.bfloat16
        np.testing.assert_allclose(u["w"], want, rtol=1e-5)
        np.testing.assert_array_equal(ls.mu["w"], mu.astype(jnp.bfloat16))
        np.testing.assert_array_equal(ls.nu["w"], nu.astype(jnp.bfloat16))
        assert not np.array_equal(np.asarray(ls.mu["w"], np.float32), np.asarray(mu))  # rounded


def test_trainer_state_with_bfloat16_moments_trains_like_float32():
    """The trainer's optimizer state holds bfloat16 moments, sharded like the parameters, and a
    few steps follow the float32-moment run closely (the same loss at step 1, then within 1%)."""
    import dataclasses

    from jax.sharding import Mesh

    from parity_util import FAST_COMPILE

    from jaxmoe.train import trainer
    from jaxmoe.train.step import StepFns

    cfg = apply_overrides(get_run("tiny-debug"), [("loss.mtp_weight", "0")]).validate()
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    plan = trainer.Plan(cfg, trainer.resolve_model_config(cfg), mesh, None, None)
    loader = B.Loader(D.stdlib_corpora(0.05, max_bytes=200_000)[0], cfg.data.seq_len, 8, 1, 0)
    losses = {}
    for dt in ("float32", "bfloat16"):
        optim = dataclasses.replace(cfg.optim, moments_dtype=dt)
        tx, lr = make_optimizer(optim, cfg.steps)
        graphdef, state = trainer.init_state(plan, tx, NamedSharding(mesh, P()))
        moments = [x for x in jax.tree.leaves(state["opt"]) if x.ndim > 0]
        assert moments and {x.dtype for x in moments} == {jnp.dtype(dt)}
        step = jax.jit(StepFns(graphdef, plan.mcfg, cfg.loss, tx, lr, cfg.steps).train_step,
                       compiler_options=FAST_COMPILE)
        losses[dt] = []
        for i in range(4):
            state, m = step(state, loader.global_batch(8 * i, NamedSharding(mesh, P(None, "data"))))
            losses[dt].append(float(m["loss"]))
    a, b = np.array(losses["float32"]), np.array(losses["bfloat16"])
    assert a[0] == b[0] and not np.array_equal(a, b)
    np.testing.assert_allclose(b, a, rtol=1e-2)
