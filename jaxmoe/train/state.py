"""The train state: the model split into trained parameters, router biases, frozen base (LoRA) and
the rest; its initialisation on the mesh (from a checkpoint, a host-side numpy init, or the
model's own init jitted with output shardings)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

import jaxmoe
from jaxmoe.config import ModelConfig
from jaxmoe.layers.params import RouterBias
from jaxmoe.train.config import TrainConfig

if TYPE_CHECKING:
    from jaxmoe.train.trainer import Plan


def split_model(model):
    from jaxmoe import lora

    if lora.has_adapters(model):  # LoRA: only the adapters train; the base is "frozen"
        graphdef, params, biases, frozen, rest = nnx.split(model, nnx.LoRAParam, RouterBias,
                                                           nnx.Param, ...)
        return graphdef, {"params": params, "biases": biases, "frozen": frozen, "rest": rest}
    graphdef, params, biases, rest = nnx.split(model, nnx.Param, RouterBias, ...)
    return graphdef, {"params": params, "biases": biases, "rest": rest}


def attach_lora(model, cfg: TrainConfig):
    """`--lora.rank > 0`: put the adapters on `model` (in place; abstract models too)."""
    if cfg.lora.rank:
        from jaxmoe import lora

        spec = lora.LoraSpec(cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout,
                             lora.LoraSpec.parse_targets(cfg.lora.targets),
                             mtp=cfg.loss.mtp_weight > 0)
        lora.attach(model, spec, jax.random.key(cfg.seed + 1))
    return model


def init_state(plan: Plan, tx, replicated: NamedSharding | None = None):
    """(graphdef, train state on the mesh). Parameters come from `--model.init_from`, from a
    numpy init on the host (small models: no init program to compile), or from the model's own
    init jitted with the output shardings (every process builds only its shards). Shardings:
    per leaf from the layout's rules (parameters and optimizer state alike), or the one
    `replicated` sharding given."""
    cfg = plan.cfg

    def finish(parts):
        return dict(parts, opt=tx.init(parts["params"]), rng=jax.random.PRNGKey(cfg.seed),
                    step=jnp.zeros((), jnp.int32))

    if cfg.model.init_from:
        loaded = jaxmoe.load_model(cfg.model.init_from, dtype=cfg.model.param_dtype,
                                   moe_impl=plan.mcfg.moe_impl)
        plan.mcfg = plan.mcfg.replace(
            num_nextn_predict_layers=loaded.cfg.num_nextn_predict_layers)
        attach_lora(loaded, cfg)
    mcfg = plan.mcfg

    def build():
        return attach_lora(jaxmoe.DeepseekV3(mcfg, rngs=nnx.Rngs(cfg.seed), remat=cfg.model.remat),
                           cfg)

    graphdef, abstract = split_model(nnx.eval_shape(build))
    if replicated is not None:
        part_sh = state_sh = replicated
    else:
        part_sh = plan.layout.shardings(abstract)
        state_sh = plan.layout.shardings(jax.eval_shape(finish, abstract))
    if cfg.model.init_from:
        _, parts = split_model(loaded)
        return graphdef, jax.jit(finish, out_shardings=state_sh)(
            jax.device_put(parts, part_sh))
    n_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
    if cfg.model.init == "host" or (cfg.model.init == "auto" and n_bytes < HOST_INIT_BYTES):
        parts = jax.device_put(host_init(abstract, mcfg, cfg.seed), part_sh)
        return graphdef, jax.jit(finish, out_shardings=state_sh)(parts)
    return graphdef, jax.jit(lambda: finish(split_model(build())[1]), out_shardings=state_sh)()


HOST_INIT_BYTES = 2 << 30


def host_init(parts: dict, mcfg: ModelConfig, seed: int) -> dict:
    """The model's init (normal(0, initializer_range); norm scales 1; router biases 0) drawn
    with numpy, one seeded stream per parameter path. Same distribution as
    `DeepseekV3(cfg, rngs)` without compiling an init program (tens of seconds on CPU)."""
    import zlib

    def one(path, x):
        name = ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                        for k in path)
        leaf = [p for p in name.split(".") if p != "value"][-1]
        if leaf == "scale":
            a = np.ones(x.shape, np.float32)
        elif leaf == "lora_b":  # LoRA: B = 0 (the adapted model starts as the base)
            a = np.zeros(x.shape, np.float32)
        elif leaf == "lora_a":  # PEFT's A ~ U(-1/sqrt(in), 1/sqrt(in)), A [.., in, r]
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            a = rng.uniform(-1, 1, x.shape).astype(np.float32) / np.sqrt(x.shape[-2])
        elif leaf.startswith("bias"):
            a = np.zeros(x.shape, np.float32)
        else:
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            a = mcfg.initializer_range * rng.standard_normal(x.shape, np.float32)
        return a.astype(x.dtype)

    return jax.tree_util.tree_map_with_path(one, parts)


def abstract_of(state, sharding=None):
    """Shapes of `state` with `sharding` (default: each leaf's own, as placed)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                       sharding=sharding or x.sharding), state)
