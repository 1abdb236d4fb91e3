"""`jaxmoe-generate`: a batch of prompts through a tokenizer.json, from a Hugging Face folder and
from a jaxmoe-train workdir (parameters restored without the optimizer state), equals
transformers' greedy continuation of each prompt; bad invocations exit with code 2 and one line
naming the problem. (One prompt streaming through the byte-level fallback: test_quant.py.)
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import parity_util as pu
import test_generate as tg
from jaxmoe.generate import cli, engine

engine.set_compiler_options(pu.FAST_COMPILE)


def word_tokenizer(path, n):
    """A tokenizer.json with n whitespace-separated words 't0'..'t{n-1}' (id = index)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(n)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece()  # joins words with spaces
    tk.save(str(path))
    return str(path)


def cli_run(argv, capsys):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _workdir(tmp_path):
    """A jaxmoe-train workdir as `--model.init_from` the v3 oracle folder leaves it: one
    checkpoint of its parameters plus optimizer moments (which generation must not read),
    written by the trainer's own Checkpointer."""
    from jaxmoe.train import trainer
    from jaxmoe.train.checkpoint import Checkpointer
    from jaxmoe.train.config import ModelSection, TrainConfig

    run = TrainConfig(name="t", workdir=str(tmp_path / "wd"),
                      model=ModelSection(init_from=str(pu.saved("v3"))))
    _, parts = trainer.split_model(pu.load(pu.saved("v3")))
    moments = jax.tree.map(lambda x: np.full(x.shape, 0.5, x.dtype), parts["params"])
    state = dict(parts, opt={"mu": moments, "nu": moments}, rng=np.zeros(2, np.uint32),
                 step=np.int32(7))
    ck = Checkpointer(str(tmp_path / "wd" / "checkpoints"), 1, 1, False)
    ck.save(7, state, {"data": {"consumed": 0}, "config": run.to_dict()}, force=True)
    ck.close()
    (tmp_path / "wd" / "config.json").write_text(json.dumps(run.to_dict()))
    return str(tmp_path / "wd")


@pytest.mark.parametrize("source", ["hf", "workdir"])
def test_batch_with_tokenizer_equals_transformers(source, tmp_path, capsys):
    m = pu.hf_model("v3")
    ckpt = str(pu.saved("v3")) if source == "hf" else _workdir(tmp_path)
    tok = word_tokenizer(tmp_path / "tokenizer.json", m.config.vocab_size)
    prompts = tg.prompts_of(tg.LENS, m.config.vocab_size)  # the shapes test_generate compiled
    texts = [" ".join(f"t{i}" for i in p) for p in prompts]
    pf = tmp_path / "prompts.txt"
    pf.write_text("\n".join(texts[1:]) + "\n")
    argv = ["--ckpt", ckpt, "--prompt", texts[0], "--prompt-file", str(pf),
            "--tokenizer", tok, "--max-new-tokens", str(tg.NEW), "--eos-id", "-1",
            "--prefill-chunk", str(tg.CHUNK), "--stats"]
    rc, out, err = cli_run(argv, capsys)
    assert rc == 0, err
    blocks = out.split("--- prompt ")[1:]
    assert len(blocks) == 3
    for i, (p, text, block) in enumerate(zip(prompts, texts, blocks)):
        ref = tg.hf_greedy(m, p, tg.NEW)
        want = text + " ".join(f"t{i}" for i in ref)
        assert block == f"{i} ---\n{want}\n", (block, want)
    assert "tokens/s" in err and "bytes/token" in err


def test_bad_invocations_exit_2(tmp_path, capsys):
    v3 = str(pu.saved("v3"))
    big = word_tokenizer(tmp_path / "big.json", 120)
    long_prompt = " ".join(["t1"] * 70)
    small = word_tokenizer(tmp_path / "small.json", 97)
    cases = [
        (["--ckpt", str(tmp_path / "nope"), "--prompt", "x"], "no such folder"),
        (["--ckpt", str(tmp_path), "--prompt", "x"], "none of a Hugging Face folder"),
        (["--ckpt", v3, "--prompt", "x", "--tokenizer", big],
         "120 tokens, but the model's vocab_size is 97"),
        (["--ckpt", v3, "--prompt", "x", "--tokenizer", str(tmp_path / "no.json")],
         "no such file"),
        (["--ckpt", v3, "--prompt", "x"], "byte-level fallback needs 256 ids"),
        (["--ckpt", v3, "--prompt", long_prompt, "--tokenizer", small],
         "prompt 0 has 70 tokens, longer than the model's max_position_embeddings=64"),
        (["--ckpt", v3], "no prompt"),
        (["--ckpt", v3, "--prompt-file", str(tmp_path / "none.txt")], "no such file"),
    ]
    for argv, msg in cases:
        rc, out, err = cli_run(argv, capsys)
        assert rc == 2 and err.startswith("jaxmoe-generate: error: ") and msg in err, (argv, err)
        assert err.count("\n") == 1, err


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--ckpt", "--prompt", "--max-new-tokens", "--temperature", "--top-p", "--seed",
                 "--tokenizer", "--fp8", "--int8-experts"):
        assert flag in out
