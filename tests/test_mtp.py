"""Multi-Token Prediction parity with reference.mtp_ref (transformers' own DeepseekV3DecoderLayer inside).

The checkpoint is the oracle's v3 save plus an extra mtp.safetensors holding two MTP depths (published
names model.layers.3.* and model.layers.4.*, independent random embedding / head, not shared with the main
model). Depth 1 consumes the main model's hidden state after the final norm; depth 2 consumes depth 1's
decoder-layer output; in both the embedding half comes FIRST in the eh_proj concatenation.
Tolerance: max|ours - ref| / max|ref| <= 1e-5.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracle
import parity_util as pu
import reference as ref
from jaxmoe import safetensors_io

TOL = 1e-5
NAME = "v3"
DEPTHS = 2


def _mtp_configs():
    """transformers configs whose num_hidden_layers puts make_mtp_weights' prefix at depth k's layer."""
    L = oracle.CONFIGS[NAME]["num_hidden_layers"]
    return [oracle.make_config(dict(oracle.CONFIGS[NAME], num_hidden_layers=L + k)) for k in range(DEPTHS)]


@pytest.fixture(scope="module")
def mtp_case():
    m = pu.hf_model(NAME)
    cfgs = _mtp_configs()
    weights = [ref.make_mtp_weights(c, seed=7 + k, init_std=pu.INIT_STD) for k, c in enumerate(cfgs)]
    path = pu.fresh_dir("mtp")
    shutil.copytree(pu.saved(NAME), path, dirs_exist_ok=True)
    extra = {k: v for w in weights for k, v in w.items()}
    safetensors_io.write(path / "mtp.safetensors", extra)
    index = path / "model.safetensors.index.json"
    if index.exists():  # a sharded save lists every tensor: add ours
        d = json.loads(index.read_text())
        d["weight_map"].update({k: "mtp.safetensors" for k in extra})
        index.write_text(json.dumps(d))
    conf = json.loads((path / "config.json").read_text())
    conf["num_nextn_predict_layers"] = DEPTHS
    (path / "config.json").write_text(json.dumps(conf))
    model = pu.load(path, mtp=True)
    toks = pu.tokens(m.config.vocab_size)
    return m, cfgs, weights, model, toks


def _ref_depths(m, cfgs, weights, toks):
    """[(logits [B, T-k, V], hidden [B, T-k, D]) for k = 1..DEPTHS] from mtp_ref."""
    h, out = oracle.hf_final_hidden(m, toks), []
    for k, (c, w) in enumerate(zip(cfgs, weights), start=1):
        layer = ref.build_mtp_layer(c, w)
        logits, h = ref.mtp_ref(c, w, h, toks[:, k - 1:], layer=layer, return_hidden=True)
        out.append((logits, h))
    return out


def test_mtp_loaded(mtp_case):
    m, cfgs, weights, model, toks = mtp_case
    assert model.cfg.num_nextn_predict_layers == DEPTHS and len(model.mtp) == DEPTHS
    L = model.cfg.num_hidden_layers
    # the MTP embedding / head are the checkpoint's own tensors, not the main model's
    for k in range(DEPTHS):
        np.testing.assert_array_equal(np.asarray(model.mtp[k].embed_VD[...]),
                                      weights[k][f"model.layers.{L + k}.embed_tokens.weight"])
    assert not np.allclose(np.asarray(model.mtp[0].embed_VD[...]), np.asarray(model.embed_VD[...]))


def test_mtp_shapes(mtp_case):
    m, cfgs, weights, model, toks = mtp_case
    out = pu.forward(model, toks, with_mtp=True)
    B, T = toks.shape
    V, E = model.cfg.vocab_size, model.cfg.n_routed_experts
    assert out.logits.shape == (B, T, V)
    assert len(out.mtp_logits) == DEPTHS and len(out.mtp_aux) == DEPTHS
    for k, (lg, aux) in enumerate(zip(out.mtp_logits, out.mtp_aux), start=1):
        assert lg.shape == (B, T - k, V) and lg.dtype == np.float32
        assert aux["counts"].shape == (E,)
        assert float(aux["counts"].sum()) == B * (T - k) * model.cfg.num_experts_per_tok
    # without with_mtp nothing is computed (traced only)
    assert jax.eval_shape(lambda t: model.forward(t), jnp.asarray(toks)).mtp_logits == ()


def test_mtp_matches_reference(mtp_case):
    m, cfgs, weights, model, toks = mtp_case
    out = pu.forward(model, toks, with_mtp=True)
    logits, hidden, mtp = out.logits, out.hidden, out.mtp_logits
    pu.assert_rel(logits, oracle.hf_logits(m, toks), TOL, "main logits with MTP loaded")
    pu.assert_rel(hidden, oracle.hf_final_hidden(m, toks), TOL, "final hidden")
    for k, (ours, (want, _)) in enumerate(zip(mtp, _ref_depths(m, cfgs, weights, toks)), start=1):
        pu.assert_rel(ours, want, TOL, f"MTP depth {k} logits")


def test_mtp_causal(mtp_case):
    m, cfgs, weights, model, toks = mtp_case
    mtp = pu.forward(model, toks, with_mtp=True).mtp_logits
    toks2 = toks.copy()
    toks2[:, -1] = (toks2[:, -1] + 1) % m.config.vocab_size
    mtp2 = pu.forward(model, toks2, with_mtp=True).mtp_logits
    for a, b in zip(mtp, mtp2):
        np.testing.assert_array_equal(a[:, :-1], b[:, :-1])  # only the last row sees the last token
        assert np.abs(a[:, -1] - b[:, -1]).max() > 1e-3


def test_concat_order_matters(mtp_case):
    m, cfgs, weights, model, toks = mtp_case
    mtp = pu.forward(model, toks, with_mtp=True).mtp_logits
    w = model.mtp[0].eh_proj_UD
    orig = w.get_value()
    D = model.cfg.hidden_size
    assert orig.shape == (2 * D, D)
    try:
        w.set_value(jnp.concatenate([orig[D:], orig[:D]], axis=0))  # hidden half first
        swapped = pu.forward(model, toks, with_mtp=True).mtp_logits
    finally:
        w.set_value(orig)
    want = _ref_depths(m, cfgs[:1], weights[:1], toks)[0][0]
    assert pu.rel_err(mtp[0], want) <= TOL
    assert pu.rel_err(swapped[0], want) > 100 * TOL, "swapping the eh_proj halves left the MTP logits unchanged"
