"""The train step's matrix products (and optimizer update) alone: a ceiling on the MFU of any step built
on XLA:CPU's GEMM.

Every matmul of one training step of `cfg` (forward Y = X W, and both backward products dX = dY W^T and
dW = X^T dY), each timed in isolation at its own shape in the plain row-major form XLA:CPU is fastest
at, summed over the step; plus, when the caller passes it as `extra`, the optimizer update on the
same parameter tree. Nothing else - norms, softmax, rope, routing, gathers, the loss - is counted, so
no step made of these parts can be faster. Choices that favour the ceiling (make it higher): the
routed experts are perfectly balanced (T*K/E rows each, no bucket padding); attention's QK^T and PV
are timed on the full square and scaled to the causal part, (T+1)/2T of it, at the full square's
efficiency.

The FLOPs listed equal `jaxmoe.train.metrics.train_flops_per_token` x tokens (checked), so
`flops / ceiling time` is directly comparable with the step's MFU.
"""

from __future__ import annotations

import collections
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def step_gemms(cfg, B: int, T: int) -> collections.Counter:
    """Forward matmuls of one step: {(batch, m, k, n, share): count} for [m, k] @ [k, n] products, of
    which `share` is computed (the causal part for attention, else 1)."""
    D, V, N = cfg.hidden_size, cfg.vocab_size, cfg.num_attention_heads
    J, R, C = cfg.qk_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    G, H, Q = cfg.v_head_dim, cfg.qk_nope_head_dim, cfg.q_lora_rank
    E, K, F, S = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.n_shared_experts
    M = B * T
    out: collections.Counter = collections.Counter()

    def mm(m, k, n, count=1, batch=1, share=1.0):
        out[(batch, m, k, n, share)] += count

    L = cfg.num_hidden_layers
    if Q:
        mm(M, D, Q, L)
        mm(M, Q, N * J, L)
    else:
        mm(M, D, N * J, L)
    mm(M, D, C + R, L)
    mm(M, C, N * (H + G), L)
    mm(M, N * G, D, L)
    causal = (T + 1) / (2 * T)  # keys per query on average, over T
    mm(T, J, T, L, batch=B * N, share=causal)  # scores
    mm(T, T, G, L, batch=B * N, share=causal)  # probabilities x values
    if cfg.num_dense_layers:
        mm(M, D, cfg.intermediate_size, 2 * cfg.num_dense_layers)
        mm(M, cfg.intermediate_size, D, cfg.num_dense_layers)
    if cfg.num_moe_layers:
        lm = cfg.num_moe_layers
        mm(M, D, E, lm)  # router
        if S:
            mm(M, D, S * F, 2 * lm)
            mm(M, S * F, D, lm)
        rows, extra = divmod(M * K, E)  # balanced: `extra` experts take one row more
        for r, n in ((rows + 1, extra), (rows, E - extra)):
            if r and n:
                mm(r, D, F, 2 * lm * n)
                mm(r, F, D, lm * n)
    mm(M, D, V)
    return out


def step_flops(gemms) -> float:
    return sum(c * 3 * 2.0 * b * m * k * n * share for (b, m, k, n, share), c in gemms.items())


def _forms(gemms) -> collections.Counter:
    """Each forward product and its two backward products as plain [m, k] @ [k, n] shapes, with
    their weight in the step (count x the share computed)."""
    w: collections.Counter = collections.Counter()
    for (b, m, k, n, share), c in gemms.items():
        for shape in ((b, m, k, n), (b, m, n, k), (b, k, m, n)):
            w[shape] += c * share
    return w


class Ceiling:
    """Callable for the benchmark's rounds: each call times every distinct GEMM shape `reps` times
    (median) and returns the step's GEMM time, sum of weight x time."""

    def __init__(self, cfg, B: int, T: int, reps: int = 5, seed: int = 0, extra=None):
        """extra: {name: fn} of other parts of the step that no implementation avoids (the
        optimizer update), timed the same way and added."""
        self.gemms = step_gemms(cfg, B, T)
        self.extra = dict(extra or {})
        self.weights = _forms(self.gemms)
        self.reps = reps
        rng = np.random.default_rng(seed)
        self.calls = {}
        dot = jax.jit(jnp.matmul)
        for b, m, k, n in self.weights:
            lead = (b,) if b > 1 else ()
            x = jnp.asarray(rng.standard_normal(lead + (m, k)), jnp.float32)
            y = jnp.asarray(rng.standard_normal(lead + (k, n)), jnp.float32)
            f = dot.lower(x, y).compile()
            f(x, y).block_until_ready()
            self.calls[(b, m, k, n)] = (f, x, y)
        self.seen: dict = collections.defaultdict(list)  # shape -> its time in each call

    def flops(self) -> float:
        return step_flops(self.gemms)

    def _time(self, fn) -> float:
        ts = []
        for _ in range(self.reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    def __call__(self) -> float:
        total = 0.0
        for shape, (f, x, y) in self.calls.items():
            self.seen[shape].append(self._time(lambda: f(x, y).block_until_ready()))
            total += self.weights[shape] * self.seen[shape][-1]
        for name, fn in self.extra.items():
            self.seen[name].append(self._time(fn))
            total += self.seen[name][-1]
        return total

    def best(self) -> float:
        """The step's GEMM (+ extra) time with every part at its fastest over all calls: the most
        favourable ceiling the measurements allow."""
        return sum((1.0 if key in self.extra else self.weights[key]) * min(ts)
                   for key, ts in self.seen.items())

    def breakdown(self) -> list[tuple[str, float, float]]:
        """(shape, ms in the step, GFLOP/s (0 for the extras)), medians over the calls, largest
        first."""
        rows = []
        for key, ts in self.seen.items():
            t = statistics.median(ts)
            if key in self.extra:
                rows.append((key, 1e3 * t, 0.0))
                continue
            b, m, k, n = key
            name = (f"{b} x " if b > 1 else "") + f"[{m}x{k}]@[{k}x{n}]"
            rows.append((name, 1e3 * self.weights[(b, m, k, n)] * t, 2.0 * b * m * k * n / t / 1e9))
        return sorted(rows, key=lambda r: -r[1])
