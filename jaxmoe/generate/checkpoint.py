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
    128x128 scales in memory (dequantised per layer inside the matmul path)."""
    import jaxmoe

    kind = kind_of(path)
    try:
        if kind == "workdir":
            return load_workdir(path, dtype, mtp)
        return jaxmoe.load_model(path, dtype=dtype, fp8=fp8, mtp=mtp)
    except (CheckpointError, FileNotFoundError) as e:
        raise GenerateError(f"--ckpt {path}: {e}") from None


def load_workdir(path: str, dtype: str = "float32", mtp="auto"):
    """The parameters of a jaxmoe-train workdir's newest checkpoint (optimizer state is not
    read), with the architecture of the run that wrote it; mtp=False drops the MTP module."""
    import dataclasses

    import jax
    import orbax.checkpoint as ocp
    from flax import nnx

    import jaxmoe
    from jaxmoe import orbax_io
    from jaxmoe.train import checkpoint as train_ckpt
    from jaxmoe.train import trainer
    from jaxmoe.train.config import TrainConfig
    from jaxmoe.train.state import split_model

    directory = os.path.abspath(os.path.join(path, "checkpoints"))
    mngr = ocp.CheckpointManager(directory, item_names=("state", "meta"))
    step = mngr.latest_step()
    if step is None:
        raise GenerateError(f"--ckpt {path}: the workdir has no finished checkpoint in "
                            f"{directory}")
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    run = _train_config(TrainConfig, dict(meta["config"]), dataclasses)
    if run.lora.rank:  # adapter-only checkpoints: the base comes from the run's --model.init_from
        mngr.close()
        from jaxmoe.train.merge import merged_model

        model = merged_model(path, step)[0]
        return model if mtp is not False else without_mtp(model)
    mcfg = trainer.resolve_model_config(run).replace(param_dtype=dtype, dtype=dtype)
    stored = orbax_io.stored_names(os.path.join(directory, str(step), "state"))
    if not any(n.startswith("params.mtp.") for n in stored):  # e.g. --model.init_from an HF
        mcfg = mcfg.replace(num_nextn_predict_layers=0)       # folder without MTP tensors
    abstract = nnx.eval_shape(lambda: jaxmoe.DeepseekV3(mcfg, rngs=nnx.Rngs(0)))
    graphdef, parts = split_model(abstract)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          train_ckpt.flatten(parts))
    got = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))  # the model only, not the optimizer state
    mngr.close()
    parts = train_ckpt.unflatten(parts, dict(got["state"]))
    model = nnx.merge(graphdef, *parts.values())
    return model if mtp is not False else without_mtp(model)


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


def _train_config(cls, d: dict, dataclasses):
    """A TrainConfig from its `to_dict()` (sections are nested dataclasses)."""
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        v = d[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default) and isinstance(v, dict):
            names = {g.name for g in dataclasses.fields(default)}
            v = type(default)(**{k: x for k, x in v.items() if k in names})
        kw[f.name] = v
    return cls(**kw)
