"""EP variant "ragged_a2a" lowers for TPU and for GPU (CUDA) on this CPU-only machine: the MoE layer under
`ep_scope` with an 8-device AbstractMesh (data 2 x expert 4), its forward and its gradient w.r.t. x and all
parameters, through `jax.export.export(jax.jit(f), platforms=[...])`, bf16, local experts on ragged_dot
(the TPU/GPU default dispatch).

An AbstractMesh carries axis names and sizes but no devices, so nothing here needs the hardware; XLA:CPU
could not compile the collective anyway (jax-ml/jax#34755). `ragged_all_to_all` lowers as a StableHLO
custom call without a cross-version stability guarantee, so that one safety check is disabled. What this
cannot show: that the device compiler accepts it and runs it correctly (tests/test_ep.py checks the
offset bookkeeping on CPU against a reference of the collective).
"""

import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax import export
from jax.sharding import AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxmoe
from jaxmoe.layers.moe import MoE
from jaxmoe.parallel.context import EPSpec, ep_scope

RAGGED = "ragged_all_to_all"
PLATFORMS = {"gpu": "cuda", "tpu": "tpu"}


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_ragged_a2a_moe_layer_exports(platform):
    cfg = jaxmoe.tiny(hidden_size=256, moe_intermediate_size=64, n_routed_experts=32, num_experts_per_tok=8,
                      n_group=8, topk_group=4, param_dtype="bfloat16", dtype="bfloat16", moe_impl="ragged_dot")
    graphdef, params, rest = nnx.split(MoE(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    mesh = AbstractMesh((2, 4), ("data", "expert"), axis_types=(AxisType.Auto,) * 2)
    spec = EPSpec(mesh, "expert", ("data", "expert"), "ragged_a2a")

    def loss(params, x):
        y, _ = nnx.merge(graphdef, params, rest)(x)
        return jnp.sum(jnp.square(y.astype(jnp.float32)))

    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (params, jnp.zeros((8, 16, 256),
                                                                                               jnp.bfloat16)))
    # 8-device shardings on the abstract mesh make an 8-device module (replicated weights: GSPMD slices
    # them into the shard_map's expert split)
    shardings = (NamedSharding(mesh, P()), NamedSharding(mesh, P(("data", "expert"))))
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), in_shardings=shardings)
    with ep_scope(spec), jax.sharding.use_abstract_mesh(mesh):
        exp = export.export(fn, platforms=[PLATFORMS[platform]],
                            disabled_checks=[export.DisabledSafetyCheck.custom_call(RAGGED)])(*shapes)
    text = exp.mlir_module()
    calls = [line for line in text.splitlines() if f"custom_call @{RAGGED}" in line]
    # forward: rows, expert ids, results back (3); backward: each row-carrying one transposed (2)
    assert len(calls) >= 5, f"{len(calls)} ragged_all_to_all calls lowered for {platform}"
    groups = {m for line in calls for m in re.findall(r"replica_groups = dense<(\[\[.*?\]\])>", line)}
    assert groups == {"[[0, 1, 2, 3], [4, 5, 6, 7]]"}, groups  # over the expert axis, per data row
    assert exp.nr_devices == 8
    assert exp.out_avals[-1].shape == (8, 16, 256)  # the last output: d x
