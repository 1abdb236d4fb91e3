"""Text <-> token ids for `jaxmoe-generate`: a `tokenizer.json` (the `tokenizers` library) or,
without one, bytes (ids 0-255, what `jaxmoe-train` learns from the built-in corpus).

`Streamer` turns the ids of one sequence into text as they arrive, holding back the end of the
text while it is an incomplete UTF-8 sequence (a byte-level or byte-fallback tokenizer emits
multi-byte characters over several tokens).
"""

from __future__ import annotations

import os

from jaxmoe.generate.engine import GenerateError

REPLACEMENT = "\ufffd"


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255; invalid sequences decode to U+FFFD."""

    name = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class JsonTokenizer:
    """A `tokenizers` tokenizer.json. Special tokens (e.g. BOS) are added as its post-processor
    says; decoding skips them."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        self.name = path
        try:
            self.tk = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise GenerateError(f"--tokenizer {path}: not a tokenizers tokenizer.json ({e})") \
                from None
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tk.decode(ids, skip_special_tokens=True)


def load_tokenizer(path: str | None, vocab_size: int):
    """The tokenizer for a model with `vocab_size` rows; a tokenizer whose ids do not all fit the
    model's vocabulary is refused (a model may have more rows than its tokenizer uses)."""
    if path is None:
        if vocab_size < ByteTokenizer.vocab_size:
            raise GenerateError(f"the model's vocab_size={vocab_size} is smaller than 256: the "
                                "byte-level fallback needs 256 ids; pass --tokenizer "
                                "tokenizer.json")
        return ByteTokenizer()
    if not os.path.isfile(path):
        raise GenerateError(f"--tokenizer {path}: no such file")
    tk = JsonTokenizer(path)
    if tk.vocab_size > vocab_size:
        raise GenerateError(f"--tokenizer {path}: {tk.vocab_size} tokens, but the model's "
                            f"vocab_size is {vocab_size}: this tokenizer does not belong to "
                            "this model")
    return tk


class Streamer:
    """Accumulates one sequence's ids; `push(id)` returns the text that became final."""

    def __init__(self, tokenizer):
        self.tk = tokenizer
        self.ids: list[int] = []
        self.emitted = 0  # characters already returned

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tk.decode(self.ids)
        if text.endswith(REPLACEMENT):  # maybe a multi-byte character still arriving
            return ""
        return self._take(text)

    def flush(self) -> str:
        return self._take(self.tk.decode(self.ids))

    def _take(self, text: str) -> str:
        new = text[self.emitted:]
        self.emitted = len(text)
        return new
