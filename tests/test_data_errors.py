"""jaxmoe.train.data: bad corpus files fail at load with a TrainConfigError (the CLI prints it as
`jaxmoe-train: error: ...`, exit 2) naming the file and the expected vs found value, before any
model is built or compiled."""

import dataclasses
import json
import re

import numpy as np
import pytest

from jaxmoe.train import batches as B
from jaxmoe.train import data as D
from jaxmoe.train.config import DataSection, TrainConfigError


def memmap(path, **kw):
    return DataSection(source="memmap", path=str(path), seq_len=3, **kw)


def raises(d, *fragments, vocab=256):
    with pytest.raises(TrainConfigError) as e:
        D.load_corpora(d, model_vocab=vocab)
    msg = str(e.value)
    for f in fragments:
        assert f in msg, msg
    return msg


def test_bin_size_not_a_multiple_of_the_dtype(tmp_path):
    p = tmp_path / "odd.bin"
    p.write_bytes(b"\x01\x00\x02\x00\x03")  # 2.5 uint16 tokens
    raises(memmap(p), str(p), "5 bytes", "uint16", "2 bytes each", "1 byte(s) left over",
           "--data.bin_dtype")
    # the same bytes are fine as uint8 (and 5 tokens of 1..3 with seq_len 3 make a row)
    train, _ = D.load_corpora(memmap(p, bin_dtype="uint8", eval_fraction=0.0), model_vocab=4)
    np.testing.assert_array_equal(train.tokens, [1, 0, 2, 0, 3])


def test_empty_files_are_refused(tmp_path):
    (tmp_path / "empty.bin").write_bytes(b"")
    raises(memmap(tmp_path / "empty.bin"), "--data.path=", str(tmp_path / "empty.bin"),
           "empty (0 bytes)")
    np.save(tmp_path / "empty.npy", np.zeros(0, np.int32))
    raises(memmap(tmp_path / "empty.npy"), str(tmp_path / "empty.npy"), "no tokens", "(0,)")
    np.arange(1, 40, dtype=np.uint16).tofile(tmp_path / "ok.bin")
    raises(memmap(tmp_path / "ok.bin", eval_path=str(tmp_path / "empty.bin")),
           "--data.eval_path=", str(tmp_path / "empty.bin"), "empty")


def test_not_a_npy_file(tmp_path):
    p = tmp_path / "bad.npy"
    p.write_bytes(b"this is not numpy")
    raises(memmap(p), str(p), "not a readable .npy")


def test_a_folder_where_a_file_is_expected(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    msg = raises(memmap(folder), f"--data.path={str(folder)!r}", "is a folder", "expected a file",
                 ".npy / .bin")
    assert "no such file" not in msg
    with pytest.raises(TrainConfigError, match="is a folder"):
        D.check_paths(memmap(folder))
    # a tokenizer folder holding a tokenizer.json: the message names the file to pass instead
    (folder / "tokenizer.json").write_text("{}")
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n')
    d = DataSection(source="jsonl", path=str(tmp_path / "d.jsonl"), tokenizer=str(folder))
    raises(d, "--data.tokenizer=", "is a folder", repr(str(folder / "tokenizer.json")))


@pytest.mark.parametrize("content", ['{"version": "1.0"', '{"not": "a tokenizer"}', "\x00\x01"])
def test_tokenizer_that_is_not_a_tokenizer_json(tmp_path, content):
    tok = tmp_path / "tokenizer.json"
    tok.write_text(content)
    (tmp_path / "d.jsonl").write_text('{"text": "hello"}\n')
    d = DataSection(source="jsonl", path=str(tmp_path / "d.jsonl"), tokenizer=str(tok))
    raises(d, f"--data.tokenizer={str(tok)!r}", "not a tokenizer.json")


def test_jsonl_that_is_binary(tmp_path):
    from tokenizers import Tokenizer, models

    tok = tmp_path / "tokenizer.json"
    Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")).save(str(tok))
    bad = tmp_path / "tokens.jsonl"
    bad.write_bytes(b"\x93NUMPY\xff\xfe\x00")
    d = DataSection(source="jsonl", path=str(bad), tokenizer=str(tok))
    raises(d, str(bad), "not UTF-8")


@pytest.fixture
def small_chunks(monkeypatch):
    """64-byte scan chunks, so a few hundred tokens cross many chunk boundaries."""
    monkeypatch.setattr(D, "CHUNK_BYTES", 64)


def test_negative_ids_fail_at_load(tmp_path, small_chunks):
    toks = np.arange(300, dtype=np.int32) % 200
    toks[137] = -3
    toks[250] = -9  # only the first offender is reported
    np.save(tmp_path / "neg.npy", toks)
    msg = raises(memmap(tmp_path / "neg.npy"), str(tmp_path / "neg.npy"), "token id -3",
                 "position 137", "negative", "256")
    assert "-9" not in msg


def test_ids_past_the_vocab_fail_at_load(tmp_path, small_chunks):
    toks = np.arange(1000, dtype=np.uint16) % 250
    toks[977] = 300  # in the held-out tail (eval_fraction), far past the first chunk
    toks.tofile(tmp_path / "big.bin")
    raises(memmap(tmp_path / "big.bin", eval_fraction=0.1), str(tmp_path / "big.bin"),
           "token id 300", "position 977", ">= vocab 256")
    # vocab - 1 is the largest legal id
    toks[977] = 255
    toks.tofile(tmp_path / "big.bin")
    D.load_corpora(memmap(tmp_path / "big.bin"), model_vocab=256)
    raises(memmap(tmp_path / "big.bin"), "token id 255", "position 977", ">= vocab 255", vocab=255)
    # a separate eval file is scanned as well, and named
    bad = np.array([1, 2, 3, 999], np.int64)
    np.save(tmp_path / "ev.npy", bad)
    raises(memmap(tmp_path / "big.bin", eval_path=str(tmp_path / "ev.npy")), "--data.eval_path=",
           str(tmp_path / "ev.npy"), "token id 999", "position 3")


def test_chunked_eos_split_matches_a_whole_array_scan(tmp_path, small_chunks):
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 20, 2000).astype(np.uint16)  # eos 0 lands on chunk edges too
    toks[31], toks[32], toks[-1] = 0, 0, 0
    c = D.memmap_corpus(toks, 0, "x", 20)
    ends = np.flatnonzero(toks == 0) + 1
    np.testing.assert_array_equal(c.doc_starts, np.concatenate([[0], ends[ends < len(toks)]]))


def test_per_batch_guard_catches_negative_ids_in_a_built_corpus():
    c = D._from_docs([np.array([1, -4, 3, 4, 5], np.int32)], 10, "built", np.int32)
    with pytest.raises(TrainConfigError, match=re.escape("built: token id -4 is negative")):
        B.pack_rows(c, np.array([0]), 3)


def test_trainer_prepare_reports_a_bad_corpus_before_compiling(tmp_path):
    from jaxmoe.train import trainer
    from jaxmoe.train.flags import parse_args

    toks = np.arange(1, 400, dtype=np.int32)
    toks[5] = -1
    np.save(tmp_path / "t.npy", toks)
    cfg = parse_args(["--config", "tiny-debug", "--data.source", "memmap",
                      "--data.path", str(tmp_path / "t.npy"), "--workdir", str(tmp_path / "w")])
    with pytest.raises(TrainConfigError, match=r"t\.npy.*token id -1 at position 5"):
        trainer.prepare(cfg)
    assert not (tmp_path / "w").exists()


def _jsonl(tmp_path, n_docs, words=30):
    """n_docs JSONL lines of `words` words each and a word-level tokenizer.json for them."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = tmp_path / "tokenizer.json"
    tk = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, **{f"w{i}": 2 + i for i in range(9)}},
                                    unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.save(str(tok))
    path = tmp_path / f"d{n_docs}.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(f"w{(d + j) % 9}" for j in range(words))})
                            + "\n" for d in range(n_docs)))
    return DataSection(source="jsonl", path=str(path), tokenizer=str(tok), seq_len=8)


def test_a_small_jsonl_corpus_still_holds_out_one_document(tmp_path, capsys):
    """25 documents at eval_fraction 0.02 (no line's hash falls in it): one document is held
    out, the one a larger fraction takes first; eval_fraction 0 holds out none."""
    d = _jsonl(tmp_path, 25)
    assert not any(D._held_out(f"line{i}", 0.02) for i in range(25))  # the case being fixed
    train, ev = D.load_corpora(d, model_vocab=16)
    assert len(ev.doc_starts) == 1 and len(train.doc_starts) == 24
    assert len(ev.tokens) == 31 and ev.n_rows(d.seq_len) >= 1  # 30 words + </s>
    first = min(range(25), key=lambda i: D._hash_rank(f"line{i}"))
    np.testing.assert_array_equal(ev.tokens, [2 + (first + j) % 9 for j in range(30)] + [1])
    _, ev2 = D.load_corpora(dataclasses.replace(d, eval_fraction=0.0), model_vocab=16)
    assert len(ev2.tokens) == 0
    assert "warning" not in capsys.readouterr().out


def test_no_eval_set_is_reported(tmp_path, capsys):
    """One document cannot be split: a warning on the trainer's log says why; an eval share too
    short for a row warns too; an explicit --data.eval_path too short for a row is an error."""
    one = _jsonl(tmp_path, 1)
    train, ev = D.load_corpora(one, model_vocab=16)
    assert len(train.doc_starts) == 1 and len(ev.tokens) == 0
    out = capsys.readouterr().out
    assert out.startswith("warning: --data.eval_fraction=0.02: no eval set") and \
        "holds one document" in out and "--data.eval_path" in out, out
    D.load_corpora(dataclasses.replace(one, eval_batches=0), model_vocab=16)  # no eval wanted
    assert capsys.readouterr().out == ""
    np.arange(1, 200, dtype=np.uint16).tofile(tmp_path / "t.bin")
    D.load_corpora(memmap(tmp_path / "t.bin", eval_fraction=0.01), model_vocab=256)  # 1 token
    out = capsys.readouterr().out
    assert "no eval set (the held-out share is 1 token(s); a row needs seq_len + 1 = 4)" in out
    np.arange(1, 4, dtype=np.uint16).tofile(tmp_path / "ev.bin")
    raises(memmap(tmp_path / "t.bin", eval_path=str(tmp_path / "ev.bin")),
           f"--data.eval_path={str(tmp_path / 'ev.bin')!r}: too short for one eval row",
           "3 token(s); a row needs seq_len + 1 = 4")
