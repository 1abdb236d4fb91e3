"""LoRA (jaxmoe/lora): zero-initialised B leaves the model exactly the base; merging equals the
adapted model; a train step changes only the adapters; a LoRA run from a converted checkpoint
lowers the loss, checkpoints only the adapters, and merges into an Orbax checkpoint that loads
and exports to Hugging Face with the adapted model's logits."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jaxmoe
from jaxmoe import lora, orbax_io
from jaxmoe.train import trainer
from jaxmoe.train.config import LoraSection
from jaxmoe.train.runs import get_run
from jaxmoe.train.optim import make_optimizer
from jaxmoe.train.step import StepFns

TOKENS = np.random.RandomState(0).randint(0, 256, (2, 12)).astype(np.int32)


_JIT = {}


def logits(model) -> np.ndarray:
    """model(TOKENS), jitted: one compile per model structure (graphdef)."""
    g, st = nnx.split(model)
    if g not in _JIT:
        _JIT[g] = jax.jit(lambda s: nnx.merge(g, s)(TOKENS))
    return np.asarray(_JIT[g](st))


def randomise_b(model, seed=1, scale=0.05):
    """Non-zero B everywhere (as after training), so the adapters change the model."""
    g, ad, rest = nnx.split(model, nnx.LoRAParam, ...)
    flat = []
    for i, (path, v) in enumerate(nnx.to_flat_state(ad)):
        if path[-1] == "lora_b":
            v = v.replace(scale * jax.random.normal(jax.random.key(seed + i), v.get_value().shape))
        flat.append((path, v))
    return nnx.merge(g, nnx.from_flat_state(flat), rest)


@pytest.mark.parametrize("over,targets,param_dtype", [
    ({"num_hidden_layers": 2, "num_nextn_predict_layers": 0}, lora.TARGETS, "float32"),  # all
    ({"q_lora_rank": None, "num_hidden_layers": 2, "num_nextn_predict_layers": 0},
     lora.DEFAULT_TARGETS, "bfloat16"),                   # wq_DNJ; a bf16 base
])
def test_zero_b_is_the_base_and_merge_is_the_adapted_model(over, targets, param_dtype):
    cfg = jaxmoe.get_preset("tiny", param_dtype=param_dtype, **over)
    model = jaxmoe.DeepseekV3(cfg, rngs=nnx.Rngs(0))
    base_paths = {p for p, _ in nnx.to_flat_state(nnx.state(model))}
    base = logits(model)
    n = lora.attach(model, lora.LoraSpec(rank=4, targets=targets), jax.random.key(0))
    assert n == sum(1 for _ in lora.adapted(model))
    ad = nnx.state(model, nnx.LoRAParam)
    assert all(p[-1] in ("lora_a", "lora_b") for p, _ in nnx.to_flat_state(ad))
    if "experts" in targets:  # one pair per expert, stacked like the experts: [L, E, D, r]
        a = nnx.to_flat_state(ad)
        shapes = {p: v.get_value().shape for p, v in a}
        assert shapes[("moe_layers", "ffn", "w_gate_EDF", "lora_a")] == (1, 8, 64, 4)  # [L, E, D, r]
        assert shapes[("moe_layers", "ffn", "w_down_EFD", "lora_b")] == (1, 8, 4, 64)
    np.testing.assert_array_equal(logits(model), base)  # B = 0: exactly the base

    model = randomise_b(model)
    adapted = logits(model)
    assert np.abs(adapted - base).max() > 1e-3
    assert lora.merge(model) == n and not lora.has_adapters(model)
    assert {p for p, _ in nnx.to_flat_state(nnx.state(model))} == base_paths  # a plain model again
    merged = logits(model)
    if param_dtype == "float32":
        np.testing.assert_allclose(merged, adapted, rtol=1e-5, atol=1e-5)
    else:  # the merged weight is rounded to bf16 once more
        np.testing.assert_allclose(merged, adapted, atol=0.05 * np.abs(adapted).max())


def test_adapter_shapes_incl_mtp_and_the_mtp_switch():
    """On the abstract model (no compile): MTP layers are adapted unless the spec says not."""
    cfg = jaxmoe.get_preset("tiny")

    def build(mtp):
        m = jaxmoe.DeepseekV3(cfg, rngs=nnx.Rngs(0))
        lora.attach(m, lora.LoraSpec(rank=4, targets=lora.TARGETS, mtp=mtp), jax.random.key(0))
        return m

    shapes = {p: v.get_value().shape for p, v in
              nnx.to_flat_state(nnx.state(nnx.eval_shape(lambda: build(True)), nnx.LoRAParam))}
    assert shapes[("mtp", 0, "layer", "attn", "wo_NGD", "lora_a")] == (4 * 16, 4)  # [N*G, r]
    assert shapes[("mtp", 0, "layer", "ffn", "w_up_EDF", "lora_b")] == (8, 4, 32)  # [E, r, F]
    assert shapes[("dense_layers", "ffn", "w_down_FD", "lora_a")] == (1, 128, 4)   # [L, F, r]
    assert shapes[("moe_layers", "attn", "wkv_b_CNI", "lora_b")] == (2, 4, 4 * 32)  # [L, r, N*I]
    no_mtp = nnx.state(nnx.eval_shape(lambda: build(False)), nnx.LoRAParam)
    assert not any(p[0] == "mtp" for p, _ in nnx.to_flat_state(no_mtp))
    with pytest.raises(ValueError, match="unknown LoRA target"):
        lora.LoraSpec(targets=("q_proj",))


def test_train_step_changes_only_the_adapters():
    cfg = get_run("tiny-debug")
    cfg = cfg.replace(lora=LoraSection(rank=4, targets="q_a,q_b,kv_a,kv_b,o,experts,shared"),
                      loss=dataclasses.replace(cfg.loss, mtp_weight=0.0))
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    rep = NamedSharding(mesh, P())
    plan = trainer.Plan(cfg, trainer.resolve_model_config(cfg), mesh, None, None)
    tx, lr = make_optimizer(cfg.optim, cfg.steps, cfg.stage)
    graphdef, state = trainer.init_state(plan, tx, rep)
    assert set(state) == {"params", "biases", "frozen", "rest", "opt", "rng", "step"}
    assert all(p[-1] in ("lora_a", "lora_b") for p, _ in nnx.to_flat_state(state["params"]))
    fns = StepFns(graphdef, plan.mcfg, cfg.loss, tx, lr, cfg.steps, lora=True, lora_dropout=0.1)
    assert not fns.use_bias  # LoRA keeps the base's router biases as loaded
    before = jax.device_get(state)
    tok = np.random.RandomState(1).randint(0, 256, (1, 8, 33)).astype(np.int32)
    batch = {"tokens": tok, "segments": np.ones_like(tok),
             "positions": np.broadcast_to(np.arange(33, dtype=np.int32), tok.shape).copy()}
    step = jax.jit(fns.train_step)
    for _ in range(2):
        state, m = step(state, batch)
    after = jax.device_get(state)
    for part in ("frozen", "biases", "rest"):
        jax.tree.map(np.testing.assert_array_equal, before[part], after[part])
    unchanged = [p for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(before["params"])[0],
                                         jax.tree.leaves(after["params"])) if np.array_equal(a, b)]
    assert not unchanged, unchanged
    assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0


def test_dropout_masks_whole_input_rows():
    a = jnp.ones((3, 50, 4))  # [L, in, r]
    st = nnx.State({"x": {"lora_a": nnx.LoRAParam(a), "lora_b": nnx.LoRAParam(a)}})
    out = lora.dropout_adapters(st, jax.random.key(0), 0.5)
    da = np.asarray(out["x"]["lora_a"].get_value())
    assert set(np.unique(da)) == {0.0, 2.0}
    assert (da == da[..., :1]).all()  # a row (one input feature) is dropped for every rank
    assert 0.3 < (da[..., 0] == 0).mean() < 0.7
    np.testing.assert_array_equal(out["x"]["lora_b"].get_value(), a)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny random transformers DeepseekV3 (byte vocabulary) converted to Orbax."""
    import oracle
    from convert.pipeline import convert

    d = tmp_path_factory.mktemp("lora_base")
    m = oracle.build_hf({**oracle.CONFIGS["v3"], "vocab_size": 256, "num_hidden_layers": 2},
                        seed=0, init_std=0.05)
    oracle.save_hf(m, d / "hf")
    convert(str(d / "hf"), str(d / "orbax"), workers=1)
    return str(d / "orbax")


def test_lora_run_from_converted_checkpoint_merge_and_export(converted, tmp_path):
    from convert.cli import main as convert_main
    from jaxmoe.train.flags import parse_args
    from jaxmoe.train.merge import main as merge_main, trained_model
    from jaxmoe.train.metrics import read_metrics

    wd = str(tmp_path / "run")
    cfg = parse_args(["--config", "tiny-debug", "--model.init_from", converted, "--workdir", wd,
                      "--model.overrides", "",
                      "--steps", "16", "--lora.rank", "8", "--lora.targets",
                      "q_a,q_b,kv_a,kv_b,o,shared,experts,mlp", "--optim.lr", "1e-2",
                      "--optim.warmup_steps", "2", "--data.eval_batches", "0", "--ckpt.every", "8",
                      "--loss.mtp_weight", "0", "--compile_cache", "", "--log.tensorboard", "false"])
    trainer.run(cfg)
    loss = np.array([r["loss"] for r in read_metrics(os.path.join(wd, "metrics.jsonl"))])
    assert len(loss) == 16 and loss[-4:].mean() < loss[:4].mean() - 0.3, loss

    # the checkpoint: adapters, their AdamW moments, rng, step - no base weight
    names = [n.removesuffix(".value") for n in
             orbax_io.stored_names(os.path.join(wd, "checkpoints", "16", "state"))]
    leaves = {n.split(".")[-1] for n in names}
    assert leaves <= {"lora_a", "lora_b", "count", "rng", "step"}, sorted(leaves)
    assert any(n.startswith("params.") for n in names) and not any("biases" in n for n in names)

    adapted, step = trained_model(wd)
    assert step == 16 and lora.has_adapters(adapted)
    want = logits(adapted)
    from jaxmoe.generate.checkpoint import load as load_for_generation

    np.testing.assert_allclose(logits(load_for_generation(wd)), want, rtol=1e-5, atol=1e-5)
    base = logits(jaxmoe.load_model(converted))
    assert np.abs(want - base).max() > 1e-2  # the adapters learned something

    out = str(tmp_path / "merged")
    assert merge_main([wd, out]) == 0
    merged = jaxmoe.load_model(out)
    assert merged.cfg.num_hidden_layers == 2
    np.testing.assert_allclose(logits(merged), want, rtol=1e-5, atol=1e-5)
    hf = str(tmp_path / "hf")
    assert convert_main(["export", out, hf, "--dtype", "float32", "--no-progress"]) == 0
    np.testing.assert_allclose(logits(jaxmoe.load_model(hf)), want, rtol=1e-5, atol=1e-5)
