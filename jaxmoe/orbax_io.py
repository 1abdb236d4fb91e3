"""Converted Orbax checkpoints: the on-disk layout, restore (with target shardings) and save.

Layout (what `orbax.checkpoint` itself writes with OCDBT, so its own restore reads it):

    OUT_DIR/manifest.ocdbt, d/...   one OCDBT key-value database (tensorstore)
        <name>/.zarray, <name>/i.j.k  one zarr v2 array per parameter, <name> = the state path
                                     joined by "." (e.g. "moe_layers.ffn.w_gate_EDF")
    OUT_DIR/_METADATA                orbax tree metadata (the nested-dict structure)
    OUT_DIR/_CHECKPOINT_METADATA     orbax checkpoint metadata
    OUT_DIR/jaxmoe.json              ModelConfig (as config.json) + dtypes; written LAST: a folder
                                     without it is not a finished checkpoint

The restore target is a nested dict of jax.ShapeDtypeStruct with string keys; each carries the
target sharding, so every process reads only the chunks of its own shards.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe.config import ModelConfig, read_json_object
from jaxmoe.safetensors_io import CheckpointError

MARKER = "jaxmoe.json"
FORMAT = "jaxmoe-orbax/1"
ORBAX_METADATA = "_METADATA"
ORBAX_CHECKPOINT_METADATA = "_CHECKPOINT_METADATA"
OCDBT_CONFIG = {"max_inline_value_bytes": 1024, "max_decoded_node_bytes": 8 << 20,
                "manifest_kind": "single"}
ZARR_DTYPES = {"float32": "<f4", "float16": "<f2", "bfloat16": "bfloat16",
               "float8_e4m3fn": "float8_e4m3fn"}  # FP8 weights kept by --keep-fp8


def param_name(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def is_orbax_dir(path) -> bool:
    """A folder that is (or was meant to become) a converted/Orbax checkpoint."""
    p = os.fspath(path)
    return os.path.isdir(p) and any(os.path.exists(os.path.join(p, f)) for f in
                                    (MARKER, ORBAX_METADATA, "manifest.ocdbt"))


def read_marker(path) -> dict:
    p = os.fspath(path)
    m = os.path.join(p, MARKER)
    if not os.path.exists(m) or not os.path.exists(os.path.join(p, ORBAX_METADATA)):
        raise CheckpointError(f"{p}: not a finished jaxmoe checkpoint (no {MARKER} / "
                              f"{ORBAX_METADATA}; an interrupted conversion never gets them)")
    meta = read_json_object(m, CheckpointError)
    if meta.get("format") != FORMAT or not meta.get("complete"):
        raise CheckpointError(f"{m}: format {meta.get('format')!r} complete="
                              f"{meta.get('complete')!r}, expected {FORMAT!r} complete=true")
    if not isinstance(meta.get("config"), dict) or not isinstance(meta.get("param_dtype"), str):
        raise CheckpointError(f"{m}: needs a 'config' object and a 'param_dtype' string, found "
                              f"{type(meta.get('config')).__name__} / "
                              f"{type(meta.get('param_dtype')).__name__}")
    return meta


def config_of(meta: dict, dtype: str | None = None) -> ModelConfig:
    dt = dtype or meta["param_dtype"]
    return ModelConfig.from_hf_config(meta["config"], param_dtype=dt, dtype=dt)


# ------------------------------------------------------------------------------ tensorstore
def kvstore_spec(directory, name: str | None = None, write: bool = False) -> dict:
    spec: dict[str, Any] = {"driver": "ocdbt",
                            "base": "file://" + os.path.abspath(os.fspath(directory)) + "/"}
    if name is not None:
        spec["path"] = name + "/"
    if write:
        spec["config"] = dict(OCDBT_CONFIG)
    return spec


def zarr_metadata(shape, dtype: str, chunks) -> dict:
    return {"shape": list(shape), "chunks": list(chunks), "dtype": ZARR_DTYPES[dtype],
            "compressor": None, "fill_value": None, "order": "C", "filters": None,
            "dimension_separator": "."}


def open_array(directory, name: str, context=None):
    """Open one stored parameter array read-only (OCDBT or plain-file Orbax layouts)."""
    import tensorstore as ts

    d = os.fspath(directory)
    meta = read_json_object(os.path.join(d, ORBAX_METADATA), CheckpointError)
    if meta.get("use_ocdbt", True):
        kv = kvstore_spec(d, name)
    else:
        kv = {"driver": "file", "path": os.path.join(os.path.abspath(d), name) + "/"}
    driver = "zarr3" if meta.get("use_zarr3") else "zarr"
    return ts.open({"driver": driver, "kvstore": kv, "open": True}, read=True,
                   context=context or ts.Context({"cache_pool": {"total_bytes_limit": 0}})
                   ).result()


def stored_names(directory) -> list[str]:
    p = os.path.join(os.fspath(directory), ORBAX_METADATA)
    tree = read_json_object(p, CheckpointError).get("tree_metadata")
    try:
        return [".".join(k["key"] for k in v["key_metadata"]) for v in tree.values()]
    except (AttributeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{p}: not Orbax tree metadata (tree_metadata.*.key_metadata"
                              f"[].key expected; {type(e).__name__}: {e})") from None


def orbax_metadata(params: Mapping[tuple, tuple]) -> dict:
    """The `_METADATA` orbax writes for a nested dict whose leaves are jax.Arrays.

    params: path (tuple of str keys) -> chunk (write) shape."""
    tree = {}
    for path, chunks in params.items():
        tree[str(tuple(path))] = {
            "key_metadata": [{"key": k, "key_type": 2} for k in path],  # 2 = dict key
            "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False,
                               "write_shape": list(chunks)}}
    return {"tree_metadata": tree, "use_ocdbt": True, "use_zarr3": False,
            "store_array_data_equal_to_fill_value": True, "custom_metadata": None}


def checkpoint_metadata() -> dict:
    return {"item_handlers":
            "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler",
            "metrics": {}, "performance_metrics": {}, "init_timestamp_nsecs": None,
            "commit_timestamp_nsecs": None, "custom_metadata": {}}


def kv_digest(directory) -> dict[str, str]:
    """sha256 of every key's value in the OCDBT database (small checkpoints; for tests)."""
    import hashlib

    import tensorstore as ts

    kv = ts.KvStore.open(kvstore_spec(directory)).result()
    return {k.decode(): hashlib.sha256(kv.read(k).result().value).hexdigest()
            for k in kv.list().result()}


# -------------------------------------------------------------------------------- restore
def _nested(flat: Mapping[tuple, Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        d = out
        for k in path[:-1]:
            d = d.setdefault(str(k), {})
        d[str(path[-1])] = v
    return out


def _sharding_for(sharding, path: tuple, sds: jax.ShapeDtypeStruct):
    if sharding is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(sharding, jax.sharding.Sharding):
        return sharding
    if isinstance(sharding, Mapping):
        s = sharding.get(path, sharding.get(tuple(str(p) for p in path)))
        if s is None:
            raise ValueError(f"no sharding given for parameter {param_name(path)}")
        return s
    return sharding(path, sds)


def restore_state(path, abstract_state: nnx.State, sharding=None, names: set | None = None
                  ) -> nnx.State:
    """Restore the arrays of `abstract_state` (shapes, dtypes) from an Orbax checkpoint.

    sharding: None (first device), one jax Sharding for all, a mapping path -> Sharding (an
    `nnx.State` of shardings also works), or a callable (path, ShapeDtypeStruct) -> Sharding.
    Arrays are cast to the abstract dtypes; only this process's shards are read.
    """
    import orbax.checkpoint as ocp

    if isinstance(sharding, nnx.State):
        sharding = {p: v.get_value() if hasattr(v, "get_value") else v
                    for p, v in nnx.to_flat_state(sharding)}
    flat = nnx.to_flat_state(abstract_state)
    stored = set(stored_names(path) if names is None else names)
    targets = {}
    for p, v in flat:
        a = v.get_value()
        name = param_name(p)
        if name not in stored:
            raise CheckpointError(f"{path}: parameter {name} {tuple(a.shape)} is not in the "
                                  "checkpoint")
        sds = jax.ShapeDtypeStruct(a.shape, a.dtype)
        targets[p] = jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=_sharding_for(sharding, p, sds))
    target = _nested(targets)
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    restored = ckptr.restore(os.path.abspath(os.fspath(path)), args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))
    for p, v in flat:
        node = restored
        for k in p:
            node = node[str(k)]
        v.set_value(node)
    return nnx.from_flat_state(flat)


def load_model(path, dtype: str | None = "float32", sharding=None, mtp: str | bool = "auto",
               **overrides):
    """A DeepseekV3 from a converted checkpoint folder; params (and compute) in `dtype`
    (None: the stored precision). See `restore_state` for `sharding`."""
    from jaxmoe.hf_io import abstract_model

    meta = read_marker(path)
    cfg = config_of(meta, dtype).replace(**overrides)
    names = set(stored_names(path))
    n = cfg.num_nextn_predict_layers
    has_mtp = n > 0 and param_name(("mtp", 0, "eh_proj_UD")) in names
    if mtp is True and not has_mtp:
        raise CheckpointError(f"{path}: MTP requested but the checkpoint has no MTP module")
    cfg = cfg.replace(num_nextn_predict_layers=n if (mtp and has_mtp) else 0)
    model = abstract_model(cfg)
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, restore_state(path, state, sharding, names))


def save_model(model, path, *, source: str | None = None) -> None:
    """Save a DeepseekV3's state as an Orbax checkpoint that `load_model` and
    `jaxmoe-convert export` read (e.g. after fine-tuning)."""
    import orbax.checkpoint as ocp

    p = os.path.abspath(os.fspath(path))
    state = nnx.state(model)
    flat = {pp: v.get_value() for pp, v in nnx.to_flat_state(state)}
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(p, _nested(flat))
    ckptr.wait_until_finished()
    write_marker(p, model.cfg, str(jnp.dtype(model.cfg.param_dtype)), source=source)


def write_marker(directory, cfg: ModelConfig, param_dtype: str, **extra) -> None:
    meta = {"format": FORMAT, "complete": True, "config": cfg.to_hf_config(),
            "param_dtype": param_dtype, **{k: v for k, v in extra.items() if v is not None}}
    write_json_durable(os.path.join(os.fspath(directory), MARKER), meta)


def write_json_durable(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
