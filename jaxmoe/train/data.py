"""Training data sources: each a `Corpus`, one flat token stream plus the offsets where
documents start (rows, order and sharding: `jaxmoe.train.batches`), checked at load.

Sources: the Python standard library's own `.py` files as bytes (built in, no download);
pre-tokenized `.npy` / `.bin` memmaps (documents split at `eos_id`); JSONL text tokenized with a
`tokenizer.json` (the `tokenizers` library).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import sysconfig
import zlib

import numpy as np

from jaxmoe.train.config import DataSection, TrainConfigError
from jaxmoe.train.metrics import log

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


@dataclasses.dataclass
class Corpus:
    tokens: np.ndarray          # [n] integer token stream (may be a memmap)
    doc_starts: np.ndarray      # [docs] int64, sorted, doc_starts[0] == 0
    vocab: int                  # tokens are < vocab
    fingerprint: str            # identifies the stream (checked on resume)
    name: str
    byte_level: bool = False

    def n_rows(self, seq_len: int) -> int:
        return max((len(self.tokens) - 1) // seq_len, 0)


# ---------------------------------------------------------------------------------- sources
def _fingerprint(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode())
    return h.hexdigest()[:16]


def _hash_rank(key: str) -> int:
    return zlib.crc32(key.encode()) % 100_000


def _held_out(key: str, fraction: float) -> bool:
    return _hash_rank(key) < fraction * 100_000


def _from_docs(docs: list[np.ndarray], vocab: int, name: str, dtype, byte_level=False) -> Corpus:
    lengths = np.array([len(d) for d in docs], np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(docs) else np.zeros(1, np.int64)
    tokens = np.concatenate(docs).astype(dtype) if docs else np.zeros(0, dtype)
    crc = zlib.crc32(tokens.tobytes())
    return Corpus(tokens, starts.astype(np.int64), vocab,
                  _fingerprint(name, len(tokens), len(docs), crc), name, byte_level)


def stdlib_files() -> list[tuple[str, str]]:
    """(relative path, absolute path) of the standard library's .py files, tests excluded."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS)
        for f in sorted(files):
            if f.endswith(".py"):
                full = os.path.join(d, f)
                out.append((os.path.relpath(full, root), full))
    return out


def stdlib_corpora(eval_fraction: float, max_bytes: int = 0) -> tuple[Corpus, Corpus]:
    """Byte-level tokens (0..255) of the stdlib `.py` files; each file one document; a file is
    held out for eval when crc32(relative path) falls in the eval fraction."""
    train, held, total = [], [], 0
    for rel, full in stdlib_files():
        try:
            with open(full, "rb") as f:
                data = np.frombuffer(f.read(), np.uint8)
        except OSError:
            continue
        if not len(data):
            continue
        if _held_out(rel, eval_fraction):
            held.append(data)
        else:
            if max_bytes and total + len(data) > max_bytes:
                continue
            train.append(data)
            total += len(data)
    if not train:
        raise TrainConfigError(f"--data.source=stdlib: no .py files under "
                               f"{sysconfig.get_paths()['stdlib']}")
    tag = f"stdlib-py{sys.version_info[0]}.{sys.version_info[1]}"
    return (_from_docs(train, 256, tag + ":train", np.uint8, True),
            _from_docs(held, 256, tag + ":eval", np.uint8, True))


CHUNK_BYTES = 4 << 20  # scans of a memmap read it this many bytes at a time (bounded memory)


def _chunks(tokens: np.ndarray):
    """(offset, chunk) over a 1-D (memmap) array, a few MiB at a time."""
    step = max(CHUNK_BYTES // tokens.dtype.itemsize, 1)
    for lo in range(0, len(tokens), step):
        yield lo, np.asarray(tokens[lo:lo + step])


def _open_memmap(path: str, bin_dtype: str, flag: str = "path") -> np.ndarray:
    where = f"--data.{flag}={path!r}"
    size = os.path.getsize(path)
    if size == 0:
        raise TrainConfigError(f"{where}: the file is empty (0 bytes); expected tokens")
    if path.endswith(".npy"):
        try:
            a = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as e:  # a bad header, pickled objects, truncated data
            raise TrainConfigError(f"{where}: not a readable .npy array ({e})") from None
        if a.ndim != 1:
            a = a.reshape(-1)  # any shape -> one token stream [n]
    else:
        dt = np.dtype(bin_dtype)
        if size % dt.itemsize:
            raise TrainConfigError(
                f"{where}: {size} bytes is not a whole number of {dt.name} tokens "
                f"({dt.itemsize} bytes each; {size % dt.itemsize} byte(s) left over) - "
                f"a truncated file or the wrong --data.bin_dtype={bin_dtype!r}")
        a = np.memmap(path, dtype=dt, mode="r")
    if not np.issubdtype(a.dtype, np.integer):
        raise TrainConfigError(f"{where}: tokens must be integers, not {a.dtype}")
    if not len(a):
        raise TrainConfigError(f"{where}: the array holds no tokens (shape {a.shape})")
    return a


def check_token_range(tokens: np.ndarray, where: str, vocab: int) -> None:
    """Every id in [0, vocab), scanned once at load in CHUNK_BYTES pieces (a memmap is never
    read whole), so a bad id fails before compiling rather than when its batch comes up."""
    signed = np.issubdtype(tokens.dtype, np.signedinteger)
    for lo, c in _chunks(tokens):
        if c.max() >= vocab or (signed and c.min() < 0):
            i = int(np.flatnonzero((c >= vocab) | (c < 0))[0])
            v = int(c[i])
            why = "is negative" if v < 0 else f">= vocab {vocab}"
            raise TrainConfigError(f"{where}: token id {v} at position {lo + i} {why} (token "
                                   f"ids must be in [0, {vocab}), the model's vocab_size)")


def memmap_corpus(tokens: np.ndarray, eos_id: int, name: str, vocab: int) -> Corpus:
    if eos_id >= 0:
        ends = np.concatenate([np.flatnonzero(c == eos_id) + (lo + 1) for lo, c in _chunks(tokens)]
                              or [np.zeros(0, np.int64)])
        starts = np.concatenate([[0], ends[ends < len(tokens)]]).astype(np.int64)
    else:
        starts = np.zeros(1, np.int64)
    st = os.stat(name) if os.path.exists(name) else None
    fp = _fingerprint(name, len(tokens), st and st.st_size, st and int(st.st_mtime), eos_id)
    return Corpus(tokens, starts, vocab, fp, name)


def memmap_corpora(d: DataSection, vocab: int) -> tuple[Corpus, Corpus]:
    """A pre-tokenized stream; eval is `eval_path` or the stream's last eval_fraction."""
    tok = _open_memmap(d.path, d.bin_dtype)
    check_token_range(tok, f"--data.path={d.path!r}", vocab)
    if d.eval_path:
        ev = _open_memmap(d.eval_path, d.bin_dtype, "eval_path")
        check_token_range(ev, f"--data.eval_path={d.eval_path!r}", vocab)
        return (memmap_corpus(tok, d.eos_id, d.path, vocab),
                memmap_corpus(ev, d.eos_id, d.eval_path, vocab))
    cut = len(tok) - int(len(tok) * d.eval_fraction)
    return (memmap_corpus(tok[:cut], d.eos_id, d.path, vocab),
            memmap_corpus(tok[cut:], d.eos_id, d.path + ":eval", vocab))


def _read_jsonl(path: str, key: str) -> list[str]:
    texts = []
    try:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                line = line.strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TrainConfigError(f"{path}:{i + 1}: not JSON ({e})") from None
                if not isinstance(obj, dict) or key not in obj:
                    raise TrainConfigError(f"{path}:{i + 1}: no {key!r} field (--data.text_key)")
                texts.append(str(obj[key]))
    except UnicodeDecodeError as e:  # a binary file (e.g. a .npy) given as the .jsonl
        raise TrainConfigError(f"{path}: not UTF-8 text ({e.reason}); expected one JSON object "
                               "per line") from None
    return texts


def jsonl_corpora(d: DataSection) -> tuple[Corpus, Corpus]:
    """Each JSONL line one document, tokenized with `tokenizer.json`; the tokenizer's EOS (if it
    has one of </s>, <|endoftext|>, <eos>) is appended to each document. Eval: `eval_path`, or
    the lines whose crc32 falls in `eval_fraction` - at least one when there are two or more."""
    from tokenizers import Tokenizer

    try:
        tk = Tokenizer.from_file(d.tokenizer)
    except Exception as e:  # the tokenizers library raises a bare Exception for any bad file
        raise TrainConfigError(f"--data.tokenizer={d.tokenizer!r}: not a tokenizer.json the "
                               f"tokenizers library can load ({e})") from None
    vocab = tk.get_vocab_size(with_added_tokens=True)
    eos = next((tk.token_to_id(t) for t in ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>")
                if tk.token_to_id(t) is not None), None)
    dtype = np.uint16 if vocab <= 65535 else np.int32

    def docs_of(texts):
        out = []
        for enc in tk.encode_batch(texts, add_special_tokens=False):
            ids = enc.ids + ([eos] if eos is not None else [])
            if ids:
                out.append(np.asarray(ids, dtype))
        return out

    texts = _read_jsonl(d.path, d.text_key)
    if d.eval_path:
        train, held = texts, _read_jsonl(d.eval_path, d.text_key)
    else:
        keys = [f"line{i}" for i in range(len(texts))]
        out = {i for i, k in enumerate(keys) if _held_out(k, d.eval_fraction)}
        if d.eval_fraction > 0 and not out and len(texts) >= 2:
            # a small corpus whose fraction rounds to no document: hold out the one that a
            # larger fraction would take first (one document: no eval set, see check_eval)
            out = {min(range(len(keys)), key=lambda i: _hash_rank(keys[i]))}
        train = [t for i, t in enumerate(texts) if i not in out]
        held = [t for i, t in enumerate(texts) if i in out]
    tag = f"{d.path}:{_fingerprint(d.tokenizer, os.path.getsize(d.tokenizer))}"
    return (_from_docs(docs_of(train), vocab, tag + ":train", dtype),
            _from_docs(docs_of(held), vocab, tag + ":eval", dtype))


FILE_KINDS = {"path": ".npy / .bin tokens or a .jsonl", "eval_path": "the same kind as --data.path",
              "tokenizer": "a tokenizer.json"}


def check_paths(d: DataSection) -> None:
    """Missing files and folders fail here, before anything is built."""
    for flag in ("path", "eval_path", "tokenizer"):
        p = getattr(d, flag)
        if p and not os.path.exists(p):
            raise TrainConfigError(f"--data.{flag}={p!r}: no such file")
        if p and os.path.isdir(p):  # each flag names one file; folders and globs are not read
            hint = ""
            if flag == "tokenizer" and os.path.isfile(os.path.join(p, "tokenizer.json")):
                hint = f" (pass {os.path.join(p, 'tokenizer.json')!r})"
            raise TrainConfigError(f"--data.{flag}={p!r}: is a folder, expected a file "
                                   f"({FILE_KINDS[flag]}){hint}")


def load_corpora(d: DataSection, model_vocab: int) -> tuple[Corpus, Corpus]:
    check_paths(d)
    if d.source == "stdlib":
        train, ev = stdlib_corpora(d.eval_fraction, d.max_bytes)
    elif d.source == "memmap":
        train, ev = memmap_corpora(d, model_vocab)
    else:
        train, ev = jsonl_corpora(d)
    if train.vocab > model_vocab:
        raise TrainConfigError(f"--data.source={d.source}: tokens reach {train.vocab - 1} but the "
                               f"model's vocab_size is {model_vocab}")
    if train.n_rows(d.seq_len) < 1:
        raise TrainConfigError(f"--data.seq_len={d.seq_len}: the corpus ({len(train.tokens)} "
                               "tokens) has no full row")
    check_eval(d, train, ev)
    return train, ev


def check_eval(d: DataSection, train: Corpus, ev: Corpus) -> None:
    """Eval asked for (`eval_path`, or `eval_fraction` > 0; `eval_batches` > 0) but not one full
    eval row of seq_len + 1 tokens: an explicit `eval_path` is an error; a held-out share that
    came out too small is a warning (the run trains, without eval losses)."""
    if d.eval_batches < 1 or ev.n_rows(d.seq_len) >= 1:
        return
    row = f"a row needs seq_len + 1 = {d.seq_len + 1}"
    if d.eval_path:
        raise TrainConfigError(f"--data.eval_path={d.eval_path!r}: too short for one eval row "
                               f"({len(ev.tokens):,} token(s); {row})")
    if d.eval_fraction <= 0:
        return
    if d.source == "jsonl" and not len(ev.tokens) and len(train.doc_starts) == 1:
        why = (f"--data.path={d.path!r} holds one document and the eval share is taken in whole "
               "documents")
    else:
        why = f"the held-out share is {len(ev.tokens):,} token(s); {row}"
    log(f"warning: --data.eval_fraction={d.eval_fraction}: no eval set ({why}); no eval loss "
        "will be logged - pass --data.eval_path for one")
