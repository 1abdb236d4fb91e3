"""FP8 (e4m3fn) block dequantisation, one block-row at a time (dsv3-spec §6).

W[r, c] = float32(W_fp8[r, c]) * scale_inv[r // br, c // bc], ragged edge blocks included; the
product is finite or the tensor is rejected. Exactly `jaxmoe.hf_io.dequantize_fp8` (the spec
formula, which tests compare against), but without materialising the expanded scale matrix:
temporaries are one block-row of float32.
"""

from __future__ import annotations

import numpy as np

from jaxmoe.safetensors_io import CheckpointError


def scale_shape(shape: tuple, block: tuple[int, int]) -> tuple[int, int]:
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


def _bad(x: np.ndarray) -> tuple[int, int] | None:
    if np.isfinite(x).all():
        return None
    r, c = np.argwhere(~np.isfinite(x))[0]
    return int(r), int(c)


def dequantize_rows(w: np.ndarray, scale_inv: np.ndarray, row0: int, block: tuple[int, int],
                    out_dtype, name: str) -> np.ndarray:
    """Rows [row0, row0 + len(w)) of an FP8 weight (row0 a multiple of the block rows) ->
    out_dtype. `scale_inv` holds the scale rows from row0 // br on (all of the
    [ceil(M/br), ceil(N/bc)] tensor when row0 == 0); row0 only places error messages."""
    br, bc = block
    rows, cols = w.shape
    if row0 % br:
        raise ValueError(f"{name}: row offset {row0} not aligned to the {br}-row FP8 block")
    s = np.asarray(scale_inv, np.float32)
    out = np.empty((rows, cols), out_dtype)
    full = (cols // bc) * bc
    for b0 in range(0, rows, br):
        b1 = min(b0 + br, rows)
        srow = s[b0 // br]
        x = np.asarray(w[b0:b1]).astype(np.float32)
        if full:
            x[:, :full].reshape(b1 - b0, full // bc, bc)[...] *= srow[:full // bc, None]
        if full < cols:
            x[:, full:] *= srow[-1]  # ragged last column block
        bad = _bad(x)
        if bad is not None:
            r, c = bad[0] + row0 + b0, bad[1]
            raise CheckpointError(f"tensor {name!r}: {x[bad]} at [{r}, {c}] after FP8 "
                                  f"dequantisation (fp8 {float(w[b0 + bad[0], c])} x scale_inv "
                                  f"{float(s[(b0 + bad[0]) // br, c // bc])}); expected "
                                  "finite values")
        out[b0:b1] = x
    return out


def check_finite(a: np.ndarray, name: str) -> None:
    if a.dtype.kind != "f" and "float" not in a.dtype.name:
        return
    bad = np.argwhere(~np.isfinite(np.asarray(a, np.float32)))  # bf16: via float32
    if bad.size:
        idx = tuple(int(i) for i in bad[0])
        raise CheckpointError(f"tensor {name!r}: {a[idx]} at {list(idx)}; expected finite values")
