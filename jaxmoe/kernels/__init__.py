"""Pallas kernels for the routed experts, each a triple (kernel.py: Pallas bodies for GPU/Triton and
TPU/Mosaic; ops.py: jitted wrapper with a custom VJP and an interpret flag; reference.py: plain jnp).

- `router`: fused scores + selection bias + group-limited top-k + renormalisation + route scale.
- `permute`: expert-sorted row gather, and the weighted combine back to tokens (both differentiable in
  the activations and the routing weights).
- `gmm`: grouped matmul (and the transposed one for weight gradients) on the expert-sorted rows: a
  Pallas-Triton kernel on GPU, jax's megablox (Mosaic) on TPU.

`jaxmoe.layers.dispatch` uses them for `moe_impl="pallas"`; on the CPU they run in interpret mode.
"""

from jaxmoe.kernels.common import PLATFORMS, resolve  # noqa: F401
