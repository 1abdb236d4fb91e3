"""`--verify`: a short prompt through the converted checkpoint (jaxmoe, float32 compute) and the
source (transformers, eager attention, float32) -> the max relative logit error
max|a - b| / max|b|. Small models only; an FP8 source is dequantised into a temporary float32
copy first (transformers' FP8 path needs a GPU).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import numpy as np

from jaxmoe.hf_io import SCALE_SUFFIX

MAX_PARAMS = 500_000_000


def _prompt(vocab: int, n: int = 12) -> np.ndarray:
    return np.array([[(7 * i + 3) % vocab for i in range(n)]], np.int32)


def _dequantised_copy(src, folder: str) -> str:
    """float32 copy of an FP8 checkpoint (config without quantization_config)."""
    from jaxmoe.safetensors_io import write

    tensors = {n: np.asarray(src.ckpt.get(n), np.float32) for n in src.names()
               if not n.endswith(SCALE_SUFFIX)}
    write(os.path.join(folder, "model.safetensors"), tensors, {"format": "pt"})
    cfg = {k: v for k, v in src.config.items() if k != "quantization_config"}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    return folder


def verify(hf_dir, out_dir) -> float | None:
    import torch
    import transformers

    import jaxmoe
    from jaxmoe import orbax_io
    from convert.source import Source

    src = Source(hf_dir)
    meta = orbax_io.read_marker(out_dir)
    cfg = orbax_io.config_of(meta, "float32")
    n_params = sum(int(np.prod(src.shape(n))) for n in src.names())
    if n_params > MAX_PARAMS:
        print(f"verify: skipped ({n_params:,} source parameters; transformers runs small "
              f"models only, limit {MAX_PARAMS:,})", file=sys.stderr)
        return None
    tokens = _prompt(cfg.vocab_size)
    from flax import nnx

    model = jaxmoe.load_model(out_dir, dtype="float32", mtp=False)
    ours = np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens), np.float32)
    # transformers' loading chatter (progress bars, a load report listing the MTP tensors it
    # does not model as unexpected) would bury the one line --verify prints
    tlog = transformers.utils.logging
    verbosity, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = _dequantised_copy(src, tmp) if src.fp8_block else src.path
            hcfg = transformers.AutoConfig.from_pretrained(path)
            hcfg._attn_implementation = "eager"
            hcfg._experts_implementation = "eager"
            model = transformers.AutoModelForCausalLM.from_pretrained(
                path, config=hcfg, dtype=torch.float32).eval()
            with torch.no_grad():
                ref = model(input_ids=torch.as_tensor(tokens, dtype=torch.long)
                            ).logits.float().numpy()
    finally:
        tlog.set_verbosity(verbosity)
        if bars:
            tlog.enable_progress_bar()
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))
