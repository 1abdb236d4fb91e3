"""Every Pallas kernel lowers for TPU (Mosaic) and for GPU (Pallas Triton) on this CPU-only machine:
`jax.export.export(jax.jit(f), platforms=[...])` of each kernel's forward and gradient, and of the whole
`moe_impl="pallas"` dispatch, at DeepSeek-like sizes (bf16, E=64, top-8, D=7168 for the row kernels).

This checks the Pallas -> Triton / Mosaic lowering (block shapes, supported ops); the final compilation
of the serialized kernels happens on the device (see bench/gpu_check.sh for the GPU run).
"""

import jax
import jax.numpy as jnp
import pytest
from jax import export

from jaxmoe.kernels import dispatch
from jaxmoe.kernels.gmm import ops as gmm_ops
from jaxmoe.kernels.permute import ops as perm_ops
from jaxmoe.kernels.router import ops as router_ops
from jaxmoe.kernels.router.reference import RouterSpec

PLATFORMS = {"gpu": "cuda", "tpu": "tpu"}
# Pallas-Triton kernels are custom calls without a cross-version stability guarantee; allow them
TRITON = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
CUSTOM_CALL = {"gpu": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}
SDS = jax.ShapeDtypeStruct
BF16, F32, I32 = jnp.bfloat16, jnp.float32, jnp.int32


def _export(fn, platform, *args):
    exp = export.export(jax.jit(fn), platforms=[PLATFORMS[platform]], disabled_checks=TRITON)(*args)
    text = exp.mlir_module()
    assert CUSTOM_CALL[platform] in text, "no Pallas kernel in the lowered module"
    return text


def _sumsq(y):
    return jnp.sum(jnp.square(y.astype(F32)))


def _kernels(platform):
    """name -> (function, argument shapes): each kernel forward + its gradient."""
    kw = dict(platform=platform, interpret=False)
    T, K, E, D, F = 96, 8, 64, 7168, 256
    spec = RouterSpec(num_experts=256, top_k=8, n_group=8, topk_group=4, scale=2.5)
    spec_v2 = RouterSpec(num_experts=160, top_k=6, n_group=8, topk_group=3, group_score="max",
                         scoring="softmax", norm=False, scale=16.0)
    block = gmm_ops.BlockSizes.get_default(platform)
    align = block.bm if platform == "gpu" else 1
    R = -(-(T * K + E * (align - 1)) // block.bm) * block.bm

    def router(spec):
        def f(logits, bias):
            w, _, s = router_ops.route(logits, bias, spec, **kw)
            return _sumsq(w) + _sumsq(s)
        return jax.value_and_grad(f), (SDS((T, spec.num_experts), F32), SDS((spec.num_experts,), F32))

    def permute(x, w, ys, experts):
        plan = perm_ops.make_plan(experts, E, align=align, row_multiple=block.bm)
        return _sumsq(perm_ops.combine(ys, w, plan, **kw)) + _sumsq(perm_ops.permute(x, plan, **kw))

    def gmm(transpose):
        def f(lhs, rhs, rows):
            return _sumsq(gmm_ops.gmm(lhs, rhs, rows, transpose_rhs=transpose, **kw))
        rhs = (E, F, 2048) if transpose else (E, 2048, F)
        return (jax.grad(f, argnums=(0, 1)), (SDS((R, 2048), BF16), SDS(rhs, BF16), SDS((E,), I32)))

    def moe(x, w, experts, wg, wu, wd):
        y = dispatch._pallas_experts(x, w, experts, wg, wu, wd, None, None, platform=platform, interpret=False)
        return _sumsq(y)

    return {
        "router_v3": router(spec),
        "router_v2": router(spec_v2),
        "permute_combine": (jax.grad(permute, argnums=(0, 1, 2)),
                            (SDS((T, D), BF16), SDS((T, K), F32), SDS((R, D), BF16), SDS((T, K), I32))),
        "gmm": gmm(False),
        "gmm_transposed": gmm(True),
        "tgmm": (lambda l, d, r: gmm_ops.tgmm(l, d, r, **kw), (SDS((R, 2048), BF16), SDS((R, F), BF16),
                                                              SDS((E,), I32))),
        "moe_pallas": (jax.grad(moe, argnums=(0, 1, 3, 4, 5)),
                       (SDS((T, 2048), BF16), SDS((T, K), F32), SDS((T, K), I32), SDS((E, 2048, F), BF16),
                        SDS((E, 2048, F), BF16), SDS((E, F, 2048), BF16))),
    }


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_every_kernel_lowers(platform):
    for name, (fn, args) in _kernels(platform).items():
        try:
            _export(fn, platform, *args)
        except Exception as e:  # name the kernel that failed
            raise AssertionError(f"{name} does not lower for {platform}: {e}") from e
