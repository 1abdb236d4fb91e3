"""What `jaxmoe-generate --ckpt DIR` accepts: a Hugging Face folder (config.json +
*.safetensors), a converted Orbax checkpoint (`jaxmoe-convert`, jaxmoe.json; also one written
with `--keep-fp8`), or a `jaxmoe-train` workdir (its newest checkpoint's parameters).
"""

from __future__ import annotations

import os

from jaxmoe.generate.engine import GenerateError
from jaxmoe.safetensors_io import CheckpointError

KINDS = ("a Hugging Face folder (config.json + *.safetensors), a jaxmoe-convert output "
         "(jaxmoe.json) or a jaxmoe-train workdir (checkpoints/)")


def kind_of(path: str) -> str:
    from jaxmoe import orbax_io

    if not os.path.exists(path):
        raise GenerateError(f"--ckpt {path}: no such folder; expected {KINDS}")
    if not os.path.isdir(path):
        raise GenerateError(f"--ckpt {path}: not a folder; expected {KINDS}")
    if orbax_io.is_orbax_dir(path):
        return "orbax"
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return "workdir"  # (its config.json is the run's, not a model's)
    if os.path.exists(os.path.join(path, "config.json")):
        return "hf"
    raise GenerateError(f"--ckpt {path}: none of {KINDS}")


def load(path: str, dtype: str = "float32", fp8: str = "dequantize", mtp="auto"):
    """A DeepseekV3 for generation. fp8="keep" keeps an FP8 checkpoint's e4m3 weights and
    128x128 scales in memory (dequantised per layer inside the matmul path). A workdir is read by
    `jaxmoe.train.merge.merged_model` (a LoRA run's adapters folded onto its base)."""
    import jaxmoe
    from jaxmoe.train.config import TrainConfigError

    kind = kind_of(path)
    try:
        if kind == "workdir":
            from jaxmoe.train.merge import merged_model

            model = merged_model(path, dtype=dtype)[0]
            return model if mtp is not False else without_mtp(model)
        return jaxmoe.load_model(path, dtype=dtype, fp8=fp8, mtp=mtp)
    except (CheckpointError, FileNotFoundError, TrainConfigError) as e:
        raise GenerateError(f"--ckpt {path}: {e}") from None


def without_mtp(model):
    """The model with num_nextn_predict_layers=0 (same main-model parameters); unchanged when
    its state has paths a plain model lacks (adapters)."""
    from flax import nnx

    from jaxmoe.hf_io import abstract_model

    if not model.cfg.num_nextn_predict_layers:
        return model
    graphdef, abstract = nnx.split(abstract_model(model.cfg.replace(num_nextn_predict_layers=0)))
    have = dict(nnx.to_flat_state(nnx.state(model)))
    flat = nnx.to_flat_state(abstract)
    if any(p not in have for p, _ in flat):
        return model
    for p, v in flat:
        v.set_value(have[p].get_value())
    return nnx.merge(graphdef, nnx.from_flat_state(flat))

