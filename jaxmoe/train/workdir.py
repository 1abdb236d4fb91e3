"""A training run's --workdir: what it holds (saved steps, run config) and what may be done with
it. Refusals that would otherwise mix two runs - a different model, --ckpt.resume false over
existing checkpoints, a path that is a file - happen here, before any initialisation.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax

import jaxmoe
from jaxmoe.config import ConfigError, ModelConfig
from jaxmoe.train import data as data_lib
from jaxmoe.train.config import TrainConfig, TrainConfigError


def param_shapes(c: ModelConfig) -> dict:
    """Every parameter's shape (abstract: nothing is allocated)."""
    from flax import nnx

    tree = nnx.state(nnx.eval_shape(lambda: jaxmoe.DeepseekV3(c, rngs=nnx.Rngs(0))))
    return {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def changed_fields(old: ModelConfig, new: ModelConfig) -> list[str]:
    return [f.name for f in dataclasses.fields(ModelConfig)
            if getattr(old, f.name) != getattr(new, f.name)]


def saved_steps(workdir: str) -> tuple[list[int], dict | None]:
    """(the steps of WORKDIR/checkpoints, the newest one's meta - data position and run config -
    or None): read only, nothing is created."""
    directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    if not os.path.isdir(directory):
        return [], None
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager(directory, item_names=("state", "meta"),
                                 options=ocp.CheckpointManagerOptions(create=False))
    try:
        steps = sorted(mngr.all_steps())
        if not steps:
            return [], None
        got = mngr.restore(steps[-1], args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return steps, dict(got["meta"])
    finally:
        mngr.close()


def check_workdir(cfg: TrainConfig, mcfg: ModelConfig,
                  resolve: Callable[[TrainConfig], ModelConfig]) -> int | None:
    """The checkpoint step this run resumes from (None: a fresh start), after refusing what
    would mix two runs in one --workdir: --ckpt.resume false over existing checkpoints, or a
    model (or LoRA set-up) whose parameter shapes differ from the checkpoint's. Before any
    initialisation, so the mistake costs seconds, not a compile and an Orbax error. `resolve`
    builds a run config's ModelConfig (the trainer's `resolve_model_config`)."""
    steps, meta = saved_steps(cfg.workdir)
    if not steps:
        return None
    wd = cfg.workdir
    if not cfg.ckpt.resume:
        raise TrainConfigError(
            f"--ckpt.resume=false, but --workdir={wd!r} already holds checkpoints (steps "
            f"{steps}); a new run there would mix with the old one's checkpoints and metrics. "
            f"Use a fresh --workdir, or remove {os.path.join(wd, 'checkpoints')} first")
    try:
        old = TrainConfig.from_dict(dict(meta["config"]))
    except (KeyError, TypeError, TrainConfigError):
        return steps[-1]  # an older run config: the restore itself reports a mismatch
    diffs = [f"lora.{f} {getattr(old.lora, f)!r} -> {getattr(cfg.lora, f)!r}"
             for f in ("rank", "targets") if getattr(old.lora, f) != getattr(cfg.lora, f)
             and (old.lora.rank or cfg.lora.rank)]
    try:
        old_m = resolve(old)
    except (TrainConfigError, ConfigError, OSError):
        old_m = None  # e.g. its --model.init_from moved; the restore reports a mismatch
    if old_m is not None and param_shapes(old_m) != param_shapes(mcfg):
        diffs += [f"{f} {getattr(old_m, f)!r} -> {getattr(mcfg, f)!r}"
                  for f in changed_fields(old_m, mcfg)]
    if diffs:
        raise TrainConfigError(
            f"--workdir={wd!r} holds checkpoints (step {steps[-1]}) of a different model: "
            f"{', '.join(diffs)} (saved -> this run). Resume it with the model flags it was "
            f"started with, or use a fresh --workdir")
    return steps[-1]


def checkpoint_meta(cfg: TrainConfig, corpus: data_lib.Corpus, consumed: int) -> dict:
    """A checkpoint's `meta` item: the data position and the run config (what resuming,
    check_workdir and `jaxmoe-train merge` read back)."""
    return {"data": {"consumed": consumed, "fingerprint": corpus.fingerprint,
                     "corpus": corpus.name}, "config": cfg.to_dict()}
