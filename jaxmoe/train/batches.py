"""Deterministic, resumable, per-process-sharded batches of a `Corpus` (`jaxmoe.train.data`).

Rows are cut from the corpus stream every `seq_len` tokens, each `seq_len + 1` long (inputs and
shifted targets), so documents are packed back to back and split across rows. Every row carries
a segment id per token (the document's index within the row, from 1; 0 is padding) from which
the step builds

  * the attention mask: causal AND same document (no attention across a boundary);
  * the positions: restarting at 0 where a document starts inside the row;
  * the loss mask: target i+1 counts only when it is in the same document as token i.

With `doc_masking=False` (the DeepSeek-V3 report's pretraining: packing without cross-sample
masking) every row is one segment: plain causal attention over the row, positions 0..seq_len,
and every next token is a target.

Order: global sample g (rows consumed so far across all processes) is row
`perm_e[g mod n]` of epoch `e = g // n`, `perm_e` a permutation seeded by (seed, e). The data
position saved with a checkpoint is the single integer `consumed`, so a resumed run (even with
another batch size) continues the stream exactly. Each process reads only the rows its devices
hold (`jax.make_array_from_callback`).
"""

from __future__ import annotations

import numpy as np

from jaxmoe.train.config import TrainConfigError
from jaxmoe.train.data import Corpus


def pack_rows(corpus: Corpus, rows: np.ndarray, seq_len: int, doc_masking: bool = True
              ) -> dict[str, np.ndarray]:
    """Rows (indices) -> tokens / segments / positions, each [len(rows), seq_len + 1] int32."""
    T1 = seq_len + 1
    starts = rows.astype(np.int64) * seq_len
    idx = starts[:, None] + np.arange(T1)[None, :]  # [R, T1] stream offsets
    # one gather over the flat offsets [R*T1], back to [R, T1]
    tokens = np.asarray(corpus.tokens[idx.reshape(-1)]).reshape(idx.shape).astype(np.int32)
    if doc_masking:
        doc = np.searchsorted(corpus.doc_starts, idx, side="right") - 1  # [R, T1] global doc index
        segments = (doc - doc[:, :1] + 1).astype(np.int32)  # 1-based within the row
        new = np.concatenate([np.ones((len(rows), 1), bool), doc[:, 1:] != doc[:, :-1]], axis=1)
        first = np.maximum.accumulate(np.where(new, np.arange(T1)[None, :], 0), axis=1)
        positions = (np.arange(T1)[None, :] - first).astype(np.int32)
    else:  # one segment per row: the masks and positions ignore document starts
        segments = np.ones(idx.shape, np.int32)
        positions = np.broadcast_to(np.arange(T1, dtype=np.int32), idx.shape).copy()
    # load_corpora already range-checked every memmap id; this per-batch guard (one min/max over
    # the few rows just gathered) covers corpora built another way (tests, tools).
    if len(tokens) and tokens.max(initial=0) >= corpus.vocab:
        raise TrainConfigError(f"{corpus.name}: token id {int(tokens.max())} >= vocab "
                               f"{corpus.vocab}")
    if len(tokens) and tokens.min(initial=0) < 0:
        raise TrainConfigError(f"{corpus.name}: token id {int(tokens.min())} is negative")
    return {"tokens": tokens, "segments": segments, "positions": positions}


class Sampler:
    """Global sample g -> row index: a fresh seeded permutation of the rows each epoch."""

    def __init__(self, n_rows: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n_rows, seed, shuffle
        self._perm: dict[int, np.ndarray] = {}

    def perm(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        if epoch not in self._perm:
            if len(self._perm) > 2:
                self._perm.clear()
            self._perm[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perm[epoch]

    def rows(self, start: int, count: int) -> np.ndarray:
        g = np.arange(start, start + count, dtype=np.int64)
        epoch, off = g // self.n, g % self.n
        out = np.empty(count, np.int64)
        for e in np.unique(epoch):
            sel = epoch == e
            out[sel] = self.perm(int(e))[off[sel]]
        return out


class Loader:
    """Global batches [A, B/A, seq_len + 1] (A = grad_accum microbatches) of one corpus, laid
    out on `sharding`; each process materialises only its own rows."""

    def __init__(self, corpus: Corpus, seq_len: int, batch_size: int, grad_accum: int, seed: int,
                 shuffle: bool = True, doc_masking: bool = True):
        self.corpus, self.seq_len, self.doc_masking = corpus, seq_len, doc_masking
        self.B, self.A = batch_size, grad_accum
        self.sampler = Sampler(corpus.n_rows(seq_len), seed, shuffle)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.A, self.B // self.A, self.seq_len + 1)

    def host_rows(self, consumed: int, mb: int, lo: int, hi: int) -> dict[str, np.ndarray]:
        """Rows lo:hi of microbatch mb of the global batch starting at sample `consumed`."""
        per = self.B // self.A
        rows = self.sampler.rows(consumed + mb * per + lo, hi - lo)
        return pack_rows(self.corpus, rows, self.seq_len, self.doc_masking)

    def host_batch(self, consumed: int) -> dict[str, np.ndarray]:
        """The whole global batch on the host (tests, single-process tools)."""
        parts = [self.host_rows(consumed, a, 0, self.B // self.A) for a in range(self.A)]
        return {k: np.stack([p[k] for p in parts]) for k in parts[0]}

    def global_batch(self, consumed: int, sharding) -> dict:
        import jax

        cache: dict[tuple, dict] = {}

        def piece(key: str, index: tuple) -> np.ndarray:
            a_sl, r_sl = index[0], index[1]
            a_ids = range(self.A)[a_sl]
            lo, hi, _ = r_sl.indices(self.B // self.A)
            out = []
            for a in a_ids:
                ck = (a, lo, hi)
                if ck not in cache:
                    cache[ck] = self.host_rows(consumed, a, lo, hi)
                out.append(cache[ck][key])
            return np.stack(out)[(slice(None), slice(None)) + tuple(index[2:])]

        return {k: jax.make_array_from_callback(self.shape, sharding, lambda i, k=k: piece(k, i))
                for k in ("tokens", "segments", "positions")}
