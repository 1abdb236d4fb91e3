"""jaxmoe: DeepSeek-V3-family mixture-of-experts models in JAX/Flax NNX."""

from jaxmoe.config import ConfigError, ModelConfig
from jaxmoe.model import DeepseekV3
from jaxmoe.presets import PRESETS, deepseek_v2, deepseek_v2_lite, deepseek_v3_671b, get_preset, tiny

__all__ = ["ConfigError", "ModelConfig", "DeepseekV3", "PRESETS", "deepseek_v2", "deepseek_v2_lite",
           "deepseek_v3_671b", "get_preset", "tiny", "load_model"]


def load_model(path, dtype: str = "float32", **kw):
    """Load a Hugging Face checkpoint folder (config.json + *.safetensors) as a DeepseekV3."""
    from jaxmoe.hf_io import load_model as _load

    return _load(path, dtype=dtype, **kw)
