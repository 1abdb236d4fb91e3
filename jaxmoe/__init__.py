"""jaxmoe: DeepSeek-V3-family mixture-of-experts models in JAX/Flax NNX."""

from jaxmoe.config import ConfigError, ModelConfig
from jaxmoe.model import DeepseekV3
from jaxmoe.generate import generate  # the function; the package is jaxmoe.generate.engine etc.
from jaxmoe.presets import PRESETS, deepseek_v2, deepseek_v2_lite, deepseek_v3_671b, get_preset, tiny

__all__ = ["ConfigError", "ModelConfig", "DeepseekV3", "PRESETS", "deepseek_v2", "deepseek_v2_lite",
           "deepseek_v3_671b", "get_preset", "tiny", "load_model", "generate"]


def load_model(path, dtype: str = "float32", fp8: str = "dequantize", **kw):
    """Load a Hugging Face checkpoint folder (config.json + *.safetensors) or a converted Orbax
    checkpoint (`jaxmoe-convert`; takes `sharding=` for the target shardings) as a DeepseekV3.

    FP8 weights: an HF folder's are dequantised into `dtype` unless fp8="keep" (e4m3 + 128x128
    scales kept in memory as `jaxmoe.quant.FP8Block`); a `jaxmoe-convert --keep-fp8` checkpoint
    always loads them kept."""
    from jaxmoe import orbax_io

    if fp8 not in ("dequantize", "keep"):
        raise ValueError(f"fp8={fp8!r}: expected 'dequantize' or 'keep'")
    if orbax_io.is_orbax_dir(path):
        if orbax_io.read_marker(path).get("fp8"):  # written by jaxmoe-convert --keep-fp8
            from jaxmoe.quant import load_orbax_fp8

            return load_orbax_fp8(path, dtype=dtype, **kw)
        return orbax_io.load_model(path, dtype=dtype, **kw)
    if fp8 == "keep":
        from jaxmoe.quant import load_hf_fp8

        return load_hf_fp8(path, dtype=dtype, **kw)
    from jaxmoe.hf_io import load_model as _load

    return _load(path, dtype=dtype, **kw)
