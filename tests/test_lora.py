"""LoRA (jaxmoe/lora): zero-initialised B leaves the model exactly the base; merging equals the
adapted model; a train step changes only the adapters; a LoRA run from a converted checkpoint
lowers the loss, checkpoints only the adapters, and merges into an Orbax checkpoint that loads
and exports to Hugging Face with the adapted model's logits."""

import dataclasses
import math
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


# The input letters of each adaptable weight: what its layer contracts with the incoming
# activation (jaxmoe/axes.py alphabet). The q, kv_a, gate and up projections read the hidden
# state D; wq_b reads the q-LoRA latent Q, wkv_b the kv latent C, wo the attention output [N, G],
# the down projections the FFN width F. E (routed experts) is a batch axis: one adapter pair per
# expert (jaxmoe/lora/adapter.py); every other letter is an output. Written out here by hand so
# that a wrong in/out split in the library cannot also be in the reference.
IN_LETTERS = {"wq_DNJ": "D", "wq_a_DQ": "D", "wq_b_QNJ": "Q", "wkv_a_DP": "D", "wkv_b_CNI": "C",
              "wo_NGD": "NG", "w_gate_EDF": "D", "w_up_EDF": "D", "w_down_EFD": "F",
              "w_gate_DF": "D", "w_up_DF": "D", "w_down_FD": "F"}


def lora_reference(name: str, w, a, b, alpha: float, rank: int) -> np.ndarray:
    """W + (alpha/r) (A @ B) in float64 numpy, per the documented convention A [.., in, r],
    B [.., r, out] with in/out read from the parameter's axis letters (leading axes of W beyond
    its letters are the [L] of a scanned stack)."""
    w = np.asarray(w, np.float64)
    letters = name.rsplit("_", 1)[1]
    stack = w.shape[:w.ndim - len(letters)]
    size = dict(zip(letters, w.shape[w.ndim - len(letters):]))
    batch = "E" if letters.startswith("E") else ""
    ins = IN_LETTERS[name]
    outs = letters[len(batch) + len(ins):]
    assert letters == batch + ins + outs, (name, "expected [E,] inputs, outputs in that order")
    lead = stack + tuple(size[c] for c in batch)
    n_in, n_out = math.prod(size[c] for c in ins), math.prod(size[c] for c in outs)
    a = np.asarray(a, np.float64).reshape(lead + (n_in, rank))   # [.., in, r]
    b = np.asarray(b, np.float64).reshape(lead + (rank, n_out))  # [.., r, out]
    return w + (alpha / rank) * (a @ b).reshape(w.shape)         # [.., in, out] -> W's axes


@pytest.mark.parametrize("over,targets,param_dtype,kinds", [
    ({"num_hidden_layers": 2, "num_nextn_predict_layers": 0}, lora.TARGETS, "float32",  # all
     set(IN_LETTERS) - {"wq_DNJ"}),
    ({"q_lora_rank": None, "num_hidden_layers": 2, "num_nextn_predict_layers": 0},
     lora.DEFAULT_TARGETS, "bfloat16",                    # wq_DNJ; a bf16 base
     {"wq_DNJ", "wkv_a_DP", "wkv_b_CNI", "wo_NGD"}),
])
def test_zero_b_is_the_base_and_merge_is_the_adapted_model(over, targets, param_dtype, kinds):
    from jaxmoe.layers.params import weight

    cfg = jaxmoe.get_preset("tiny", param_dtype=param_dtype, **over)
    model = jaxmoe.DeepseekV3(cfg, rngs=nnx.Rngs(0))
    base_paths = {p for p, _ in nnx.to_flat_state(nnx.state(model))}
    base = logits(model)
    rank, alpha = 4, 12.0  # scale 3, not the default alpha's 8
    n = lora.attach(model, lora.LoraSpec(rank=rank, alpha=alpha, targets=targets),
                    jax.random.key(0))
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
    # the weight every layer reads (layers.params.weight) against the numpy statement of LoRA
    want = {}
    for path, owner, name, lw in lora.adapted(model):
        assert np.abs(np.asarray(lw.lora_b[...])).min() > 0, path  # B random: a real delta
        ref = lora_reference(name, lw.base[...].astype(jnp.float32), lw.lora_a[...],
                             lw.lora_b[...], alpha, rank)
        got = np.asarray(weight(lw, cfg))
        assert got.shape == ref.shape, path
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7, err_msg=path)
        want[path] = (owner, name, ref)
    assert {name for _, name, _ in want.values()} == kinds
    adapted = logits(model)
    assert np.abs(adapted - base).max() > 1e-3
    assert lora.merge(model) == n and not lora.has_adapters(model)
    assert {p for p, _ in nnx.to_flat_state(nnx.state(model))} == base_paths  # a plain model again
    for path, (owner, name, ref) in want.items():  # merged: the same weight in param_dtype
        got = getattr(owner, name)[...]
        assert got.dtype == jnp.dtype(param_dtype), path
        # float32: summation order only; bf16: one rounding of the f32 sum (2^-9 relative)
        tol = dict(rtol=1e-5, atol=1e-7) if param_dtype == "float32" else dict(rtol=2**-8, atol=0)
        np.testing.assert_allclose(np.asarray(got, np.float32), ref, **tol, err_msg=path)
    merged = logits(model)
    if param_dtype == "float32":
        np.testing.assert_allclose(merged, adapted, rtol=1e-5, atol=1e-5)
    else:  # every merged weight is rounded to bf16 once more (checked element-wise above): here
        # the logits move by 0.5% of their max (seeds 0-7: 0.2-0.5%, or more where the rounding
        # flips a routing choice)
        np.testing.assert_allclose(merged, adapted, atol=1e-2 * np.abs(adapted).max())


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

    # exported tensors in the published [out, in] layout: the source checkpoint's W + s (A B)^T
    import oracle

    exported = oracle._read_safetensors_dir(hf)
    source = oracle._read_safetensors_dir(os.path.join(os.path.dirname(converted), "hf"))
    ad = {path: lw for path, _, _, lw in lora.adapted(adapted)}
    s = cfg.lora.alpha / 8
    L = adapted.cfg.first_k_dense_replace  # the first MoE layer: moe_layers[0]
    A, B = (np.asarray(x[...], np.float64) for x in (ad["moe_layers.attn.wkv_b_CNI"].lora_a,
                                                      ad["moe_layers.attn.wkv_b_CNI"].lora_b))
    key = f"model.layers.{L}.self_attn.kv_b_proj.weight"      # [N*(H+G), C]: A [C, r], B [r, N*I]
    np.testing.assert_allclose(exported[key], source[key] + s * (A[0] @ B[0]).T,
                               rtol=1e-5, atol=1e-6, err_msg=key)
    A, B = (np.asarray(x[...], np.float64) for x in (ad["moe_layers.ffn.w_down_EFD"].lora_a,
                                                      ad["moe_layers.ffn.w_down_EFD"].lora_b))
    key = f"model.layers.{L}.mlp.experts.3.down_proj.weight"  # [D, F]: A [F, r], B [r, D]
    np.testing.assert_allclose(exported[key], source[key] + s * (A[0, 3] @ B[0, 3]).T,
                               rtol=1e-5, atol=1e-6, err_msg=key)
    assert np.abs(exported[key] - source[key]).max() > 1e-4  # the adapter moved this expert
