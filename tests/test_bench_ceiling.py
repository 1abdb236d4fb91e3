"""bench/gemm_ceiling.py lists every matmul of a training step: its FLOPs must equal the MFU numerator
(`train_flops_per_token`), derived independently from the parameter count, for every layer mix."""

import os
import sys

import pytest

import jaxmoe
from jaxmoe.train.metrics import train_flops_per_token

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
import gemm_ceiling  # noqa: E402


@pytest.mark.parametrize("over", [
    {},  # tiny: q_lora, shared expert, dense first layer
    {"q_lora_rank": None, "n_shared_experts": 2, "first_k_dense_replace": 0},
    {"n_routed_experts": 7, "num_experts_per_tok": 3, "n_group": 1, "topk_group": 1,
     "n_shared_experts": 0, "first_k_dense_replace": 2, "num_hidden_layers": 3},
])
@pytest.mark.parametrize("B,T", [(2, 16), (3, 17)])
def test_gemm_list_flops_equal_the_mfu_count(over, B, T):
    cfg = jaxmoe.tiny(num_nextn_predict_layers=0, **over)
    gemms = gemm_ceiling.step_gemms(cfg, B, T)
    want = train_flops_per_token(cfg, T, False) * B * T
    assert gemm_ceiling.step_flops(gemms) == pytest.approx(want, rel=1e-12)
    # the backward forms cover the same products: every shape appears with its two transposes
    forms = gemm_ceiling._forms(gemms)
    assert sum(2.0 * b * m * k * n * w for (b, m, k, n), w in forms.items()) == pytest.approx(want, rel=1e-12)
