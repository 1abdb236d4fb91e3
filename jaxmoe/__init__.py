"""jaxmoe: DeepSeek-V3-family mixture-of-experts models in JAX/Flax NNX."""

from jaxmoe.config import ConfigError, ModelConfig
from jaxmoe.model import DeepseekV3
from jaxmoe.presets import PRESETS, deepseek_v2, deepseek_v2_lite, deepseek_v3_671b, get_preset, tiny

__all__ = ["ConfigError", "ModelConfig", "DeepseekV3", "PRESETS", "deepseek_v2", "deepseek_v2_lite",
           "deepseek_v3_671b", "get_preset", "tiny", "load_model"]


def load_model(path, dtype: str = "float32", **kw):
    """Load a Hugging Face checkpoint folder (config.json + *.safetensors) or a converted Orbax
    checkpoint (`jaxmoe-convert`; takes `sharding=` for the target shardings) as a DeepseekV3."""
    from jaxmoe import orbax_io

    if orbax_io.is_orbax_dir(path):
        return orbax_io.load_model(path, dtype=dtype, **kw)
    from jaxmoe.hf_io import load_model as _load

    return _load(path, dtype=dtype, **kw)
