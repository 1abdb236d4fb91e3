"""MTP speculative decoding gives exactly the greedy tokens: the v3 oracle's weights plus an MTP
module (transformers has none), a batch of prompts of different lengths, each continuation
compared with transformers' greedy `generate` on that prompt alone. Two MTP modules: random
weights (drafts mostly rejected) and a "repeat the last token" module (its layer adds nothing,
eh_proj passes the hidden state, the head is the LM head), which is accepted whenever greedy
decoding repeats a token - so both the accept and the reject branches are taken.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

import parity_util as pu
import test_generate as tg
from jaxmoe.generate import cli, engine
from jaxmoe.generate.speculative import run_speculative
from jaxmoe.hf_io import abstract_model

engine.set_compiler_options(pu.FAST_COMPILE)


def with_mtp(copy_last: bool):
    """pu.load("v3") plus an MTP module (random normal(0, 0.08) weights, norms 1)."""
    from jaxmoe.train.state import host_init

    base = pu.load(pu.saved("v3"))
    cfg = base.cfg.replace(num_nextn_predict_layers=1)
    graphdef, abstract = nnx.split(abstract_model(cfg))
    state = host_init(abstract, cfg.replace(initializer_range=0.08), seed=1)
    have = dict(nnx.to_flat_state(nnx.state(base)))
    flat = nnx.to_flat_state(state)
    D = cfg.hidden_size
    for p, v in flat:
        if p in have:
            v.set_value(have[p].get_value())
        elif copy_last:
            name = p[-1]
            if name == "eh_proj_UD":  # [embedding; hidden] -> hidden
                v.set_value(jnp.concatenate([jnp.zeros((D, D)), jnp.eye(D)]))
            elif name in ("wo_NGD", "w_down_EFD", "w_down_FD"):  # the layer adds nothing
                v.set_value(jnp.zeros_like(v.get_value()))
            elif name == "head_DV":
                v.set_value(have[("lm_head_DV",)].get_value())
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def test_speculative_equals_greedy(tmp_path, capsys):
    m = pu.hf_model("v3")
    prompts = tg.prompts_of(tg.LENS, m.config.vocab_size)
    refs = [tg.hf_greedy(m, p, 12) for p in prompts]
    rates = {}
    for copy_last in (False, True):
        model = with_mtp(copy_last)
        seen = []
        g = run_speculative(model, prompts, 12, eos_id=None, prefill_chunk=tg.CHUNK,
                            on_token=lambda i, t: seen.append(t))
        for i, (ours, ref) in enumerate(zip(g.tokens, refs)):
            assert ours == ref, f"copy_last={copy_last} prompt {i}: {ours} != greedy {ref}"
        for r in range(len(prompts)):  # streamed in order
            assert [t[r] for t in seen if t[r] is not None] == g.tokens[r]
        rates[copy_last] = (g.acceptance, g.decode_steps)
    # plain greedy needs 11 decode steps after the prefill's token; no more here
    assert rates[False][1] <= 11 and rates[True][1] <= 11, rates
    assert rates[True][0] > 0.1 and rates[True][0] > rates[False][0], rates
    # the CLI on a converted-style Orbax checkpoint of the same model
    from jaxmoe import orbax_io

    orbax_io.save_model(model, tmp_path / "ckpt")
    tok = tmp_path / "tok.json"
    import test_generate_cli as tc

    tc.word_tokenizer(tok, m.config.vocab_size)
    texts = [" ".join(f"t{i}" for i in p) for p in prompts]
    argv = ["--ckpt", str(tmp_path / "ckpt"), "--speculative", "--tokenizer", str(tok),
            "--max-new-tokens", "12", "--eos-id", "-1", "--stats", "--prefill-chunk",
            str(tg.CHUNK)]
    rc = cli.main(argv + [a for t in texts for a in ("--prompt", t)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    want = "".join(f"--- prompt {i} ---\n{t}{' '.join(f't{x}' for x in r)}\n"
                   for i, (t, r) in enumerate(zip(texts, refs)))
    assert out == want
    assert "of MTP drafts accepted" in err
