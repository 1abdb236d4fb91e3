"""The naive MLA's block-causal query chunks (mla.Q_CHUNK) change nothing but the work skipped:
outputs and gradients equal the float64 spec reference and the single-block computation, with and
without a document mask, for chunk sizes that do and do not divide T."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxmoe
import reference as ref
from jaxmoe.layers import mla, rope
from test_semantics import _rope_params

B, T = 2, 23


def _setup():
    c = jaxmoe.tiny(initializer_range=0.3, q_lora_rank=None)
    m = mla.MLA(c, rngs=nnx.Rngs(3))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((B, T, c.hidden_size)), jnp.float32) * 0.5
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    cos, sin = rope.rope_angles(pos, c)
    return c, m, x, pos, cos, sin


def _doc_mask():
    seg = np.ones((B, T), np.int32)
    seg[0, 9:] = 2   # row 0: documents [0, 9) and [9, 23)
    seg[1, 17:] = 3  # row 1: documents [0, 17) and [17, 23)
    same = seg[:, None, :, None] == seg[:, None, None, :]
    return jnp.asarray(same & np.tril(np.ones((T, T), bool)))  # [B, 1, T, T]


def _close_tree(got, want, tol=1e-5):
    """max|got - want| <= tol * max|want|, leaf by leaf (the repository's parity measure)."""
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= tol * np.abs(b).max(), (np.abs(a - b).max(), np.abs(b).max())


def _run(m, x, pos, cos, sin, mask, chunk, monkeypatch, grads=True):
    monkeypatch.setattr(mla, "Q_CHUNK", chunk)
    gd, st = nnx.split(m)

    def f(st, x):
        return nnx.merge(gd, st)(x, pos, cos, sin, mask)

    # jitted per call: each call traces afresh, so it sees the Q_CHUNK patched above
    y = jax.jit(f)(st, x)
    if not grads:
        return np.asarray(y), None
    g = jax.jit(jax.grad(lambda st, x: (f(st, x) ** 2).sum(), argnums=(0, 1)))(st, x)
    return np.asarray(y), g


def test_chunks_equal_one_block_and_the_reference(monkeypatch):
    c, m, x, pos, cos, sin = _setup()
    y1, g1 = _run(m, x, pos, cos, sin, None, 1000, monkeypatch)
    for chunk in (5, 8):  # 8 does not divide T = 23; 5 leaves a 3-row last block
        yc, gc = _run(m, x, pos, cos, sin, None, chunk, monkeypatch)
        np.testing.assert_allclose(yc, y1, rtol=1e-5, atol=1e-6)
        _close_tree(gc, g1)
    a = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
    N = c.num_attention_heads
    w = {"q_proj.weight": a(m.wq_DNJ).reshape(c.hidden_size, -1).T,
         "kv_a_proj_with_mqa.weight": a(m.wkv_a_DP).T, "kv_a_layernorm.weight": a(m.kv_norm.scale),
         "kv_b_proj.weight": a(m.wkv_b_CNI).reshape(c.kv_lora_rank, -1).T,
         "o_proj.weight": a(m.wo_NGD).reshape(N * c.v_head_dim, -1).T}
    conf = {k: getattr(c, k) for k in ("num_attention_heads", "qk_nope_head_dim", "qk_rope_head_dim",
                                       "v_head_dim", "kv_lora_rank", "rms_norm_eps")}
    conf["rope_parameters"] = _rope_params(c)
    want = ref.mla_ref(np.asarray(x, np.float64), w, conf)
    assert np.abs(yc - want).max() <= 1e-5 * np.abs(want).max()


def test_chunks_respect_a_document_mask(monkeypatch):
    _, m, x, pos, cos, sin = _setup()
    mask = _doc_mask()
    chunk = 4
    y1, g1 = _run(m, x, pos, cos, sin, mask, 1000, monkeypatch)
    yc, gc = _run(m, x, pos, cos, sin, mask, chunk, monkeypatch)
    np.testing.assert_allclose(yc, y1, rtol=1e-5, atol=1e-6)
    _close_tree(gc, g1)
    # the mask is honoured: a second document's first token equals that token run on its own
    solo, _ = _run(m, x[:1, 9:], pos[:1, :T - 9], *rope.rope_angles(pos[:1, :T - 9], m.cfg), None,
                   chunk, monkeypatch, grads=False)
    np.testing.assert_allclose(yc[:1, 9:], solo, rtol=1e-4, atol=1e-5)
