"""FP8 (e4m3fn) dequantisation for the converter (dsv3-spec §6).

W[r, c] = float32(W_fp8[r, c]) * scale_inv[r // br, c // bc], ragged edge blocks included; the
product is finite or the tensor is rejected. The formula has one implementation,
`jaxmoe.quant.fp8.scale_blocks` (numpy or jax.numpy); `dequantize_rows` is its numpy form one
block-row at a time (temporaries are a few block-rows of float32, no expanded scale matrix),
shared with `jaxmoe.hf_io.dequantize_fp8`, and the pipeline's XLA kernel calls it with jnp.
"""

from __future__ import annotations

import numpy as np

from jaxmoe.quant.fp8 import dequantize_rows, scale_shape  # noqa: F401  (the converter's names)
from jaxmoe.safetensors_io import CheckpointError


def check_finite(a: np.ndarray, name: str, row0: int = 0) -> None:
    """`a`: rows [row0, row0 + len(a)) of tensor `name` (the error names the tensor's own index)."""
    if a.dtype.kind != "f" and "float" not in a.dtype.name:
        return
    bad = np.argwhere(~np.isfinite(np.asarray(a, np.float32)))  # bf16: via float32
    if bad.size:
        idx = tuple(int(i) for i in bad[0])
        where = [idx[0] + row0, *idx[1:]] if idx else []  # (a 0-d tensor: no index)
        raise CheckpointError(f"tensor {name!r}: {a[idx]} at {where}; expected finite values")
