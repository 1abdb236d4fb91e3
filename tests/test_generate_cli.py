"""`jaxmoe-generate`: a batch of prompts through a tokenizer.json, from a Hugging Face folder and
from a jaxmoe-train workdir (parameters restored without the optimizer state), equals
transformers' greedy continuation of each prompt; bad invocations exit with code 2 and one line
naming the problem - those the arguments or the config alone decide before the weights are
loaded, and none after any output. (One prompt streaming through the byte-level fallback:
test_quant.py.)
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
    from jaxmoe.train.checkpoint import Checkpointer
    from jaxmoe.train.config import ModelSection, TrainConfig

    run = TrainConfig(name="t", workdir=str(tmp_path / "wd"),
                      model=ModelSection(init_from=str(pu.saved("v3"))))
    from jaxmoe.train.state import split_model

    _, parts = split_model(pu.load(pu.saved("v3")))
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


def _no_load(monkeypatch):
    """Make loading the weights fail the test: errors that the arguments (or the config) decide
    must come before it."""
    from jaxmoe.generate import checkpoint

    def load(*a, **k):
        raise AssertionError("checkpoint.load was called before the bad argument was reported")

    monkeypatch.setattr(checkpoint, "load", load)


def test_argument_errors_come_before_the_load(tmp_path, capsys, monkeypatch):
    _no_load(monkeypatch)
    v3 = str(pu.saved("v3"))  # vocab 97, max_position_embeddings 64
    small = word_tokenizer(tmp_path / "small.json", 97)
    big = word_tokenizer(tmp_path / "big.json", 120)
    bad_utf8 = tmp_path / "bad.txt"
    bad_utf8.write_bytes(b"t1 t2\nt3 \xff t4\n")
    base = ["--ckpt", v3, "--prompt", "t1 t2", "--tokenizer", small, "--max-new-tokens", "4"]
    capsys.readouterr()  # (saving the oracle folder reports progress)
    cases = [  # argument values alone
        (["--temperature", "-1.0"], "--temperature -1.0: must be >= 0"),
        (["--temperature", "nan"], "--temperature nan: must be >= 0"),
        (["--top-p", "0"], "--top-p 0.0: must be in (0, 1]"),
        (["--top-p", "1.5"], "--top-p 1.5: must be in (0, 1]"),
        (["--max-new-tokens", "-1"], "--max-new-tokens -1: must be >= 0"),
        (["--prefill-chunk", "0"], "--prefill-chunk 0: must be >= 1"),
        (["--seed", "-1"], "--seed -1: must be in [0, 2**32)"),
        (["--seed", str(2**64)], f"--seed {2**64}: must be in [0, 2**32)"),
        (["--speculative", "--temperature", "0.5"], "--speculative decodes greedily"),
        (["--tokenizer", str(tmp_path / "no.json")], f"--tokenizer {tmp_path}/no.json: no such"),
        (["--prompt-file", str(bad_utf8)],
         f"--prompt-file {bad_utf8}: not UTF-8 text: byte 0xff at offset 9 (line 2)"),
        # what the config.json alone decides
        (["--eos-id", "97"], "--eos-id 97: outside the model's vocabulary [0, 97) "
                             "(vocab_size=97)"),
        (["--eos-id", "9999"], "--eos-id 9999: outside the model's vocabulary [0, 97)"),
        (["--eos-id", "-2"], "--eos-id -2: outside the model's vocabulary [0, 97)"),
        (["--tokenizer", big], "120 tokens, but the model's vocab_size is 97"),
        (["--max-new-tokens", "63"], "with max_new_tokens=63 it needs 65 positions"),
    ]
    for extra, msg in cases:
        rc, out, err = cli_run(base + extra, capsys)
        assert rc == 2 and err.startswith("jaxmoe-generate: error: ") and msg in err, (extra, err)
        assert err.count("\n") == 1 and out == "", (extra, err, out)
    # an argument error wins over a missing checkpoint (nothing is opened)
    rc, out, err = cli_run(["--ckpt", str(tmp_path / "nope"), "--prompt", "x", "--top-p", "2"],
                           capsys)
    assert rc == 2 and "--top-p 2.0: must be in (0, 1]" in err, err


def test_prompt_file_line_ends_and_unreadable(tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_bytes("t1 t2\r\n\r\nt3 é\rt4\n".encode())
    assert cli._read_prompt_file(str(f)) == ["t1 t2", "t3 é", "t4"]
    rc, out, err = cli_run(["--ckpt", str(tmp_path), "--prompt-file", str(tmp_path)], capsys)
    assert rc == 2 and f"--prompt-file {tmp_path}: no such file" in err, err


def test_late_checks_after_load_and_before_output(tmp_path, capsys, monkeypatch):
    """--speculative without an MTP module fails before the prompt is echoed; a workdir's config
    is known only after the load, and its EOS / tokenizer checks still run before generating."""
    v3 = str(pu.saved("v3"))  # transformers writes no MTP tensors
    tok = word_tokenizer(tmp_path / "tok.json", 97)
    base = ["--ckpt", v3, "--prompt", "t1 t2", "--tokenizer", tok, "--max-new-tokens", "4"]
    rc, out, err = cli_run(base + ["--speculative"], capsys)
    assert rc == 2 and out == "", out
    assert err.startswith(f"jaxmoe-generate: error: --speculative: --ckpt {v3} has no MTP "
                          "module") and err.count("\n") == 1, err
    # a config that cannot be read ahead (as a workdir's): the same checks after the load
    monkeypatch.setattr(cli, "_peek_config", lambda path: None)
    ran = []
    monkeypatch.setattr(engine, "run", lambda *a, **k: ran.append(1))
    for extra, msg in ((["--eos-id", "9999"], "--eos-id 9999: outside the model's vocabulary "
                                              "[0, 97) (vocab_size=97)"),
                       (["--max-new-tokens", "63"], "it needs 65 positions")):
        rc, out, err = cli_run(base + extra, capsys)
        assert rc == 2 and msg in err and out == "" and not ran, (extra, err, out)


def test_engine_api_names_its_arguments():
    """The one check the CLI shares, worded for API callers; run() refuses a bad EOS id."""
    cases = [(dict(temperature=-1.0), "temperature=-1.0: must be >= 0"),
             (dict(top_p=0.0), "top_p=0.0: must be in (0, 1]"),
             (dict(max_new_tokens=-3), "max_new_tokens=-3: must be >= 0"),
             (dict(prefill_chunk=0), "prefill_chunk=0: must be >= 1"),
             (dict(seed=2**32), f"seed={2**32}: must be in [0, 2**32)")]
    for kw, msg in cases:
        with pytest.raises(engine.GenerateError) as e:
            engine.check_settings(**kw)
        assert str(e.value).startswith(msg), (kw, str(e.value))
    engine.check_settings(max_new_tokens=0, temperature=0.0, top_p=1.0, seed=2**32 - 1,
                          prefill_chunk=1)
    model = pu.load(pu.saved("v3"))
    for eos in (97, -1):
        with pytest.raises(engine.GenerateError) as e:
            engine.run(model, [[1, 2]], 2, eos_id=eos)
        assert str(e.value).startswith(f"eos_id={eos}: outside the model's vocabulary [0, 97)")
        assert "(None: never stop early)" in str(e.value)
    engine.check_eos(None, 97)
    engine.check_eos(96, 97)


def test_workdir_prompt_too_long_fails_before_any_output(tmp_path, capsys, monkeypatch):
    """A jaxmoe-train workdir's config is known only once it is loaded: a single (streamed)
    prompt longer than max_position_embeddings still fails with nothing on stdout - the prompt
    is not echoed first - and nothing is generated."""
    from jaxmoe.generate import checkpoint

    wd = _workdir(tmp_path)  # the v3 oracle: vocab 97, max_position_embeddings 64
    assert checkpoint.kind_of(wd) == "workdir" and cli._peek_config(wd) is None
    tok = word_tokenizer(tmp_path / "tok.json", 97)
    ran = []
    monkeypatch.setattr(engine, "run", lambda *a, **k: ran.append(1))
    capsys.readouterr()
    rc, out, err = cli_run(["--ckpt", wd, "--prompt", " ".join(["t1"] * 70), "--tokenizer", tok],
                           capsys)
    assert rc == 2 and out == "" and not ran, (out, err)
    assert err == ("jaxmoe-generate: error: prompt 0 has 70 tokens, longer than the model's "
                   "max_position_embeddings=64\n"), err
    rc, out, err = cli_run(["--ckpt", wd, "--prompt", "t1 t2", "--tokenizer", tok,
                            "--max-new-tokens", "4", "--eos-id", "97"], capsys)
    assert rc == 2 and out == "" and not ran and "--eos-id 97: outside" in err, (out, err)
