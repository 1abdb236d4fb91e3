"""Pallas kernels for the routed experts, each a triple (kernel.py: Pallas bodies for GPU/Triton and
TPU/Mosaic; ops.py: the `pallas_call` launch wrapped in a `jax.custom_vjp`, cached per static setting
(platform, interpret, block sizes) and traced inside the caller's jit; reference.py: plain jnp).

- `router`: fused scores + selection bias + group-limited top-k + renormalisation + route scale.
- `permute`: expert-sorted row gather, and the weighted combine back to tokens (both differentiable in
  the activations and the routing weights).
- `gmm`: grouped matmul (and the transposed one for weight gradients) on the expert-sorted rows: a
  Pallas-Triton kernel on GPU, jax's megablox (Mosaic) on TPU.

`dispatch` is the routed-expert switch (`ModelConfig.moe_impl`): it uses them for "pallas" (on the CPU
in interpret mode), `segment` (per-expert GEMM loop with a custom VJP) for "segment", and
`jax.lax.ragged_dot` or a dense masked einsum for the other two. The MoE layer and the expert-parallel
bodies (`jaxmoe.parallel`) call it.
"""

