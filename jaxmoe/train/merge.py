"""`jaxmoe-train merge WORKDIR OUT_DIR`: a training run's result as a converted Orbax checkpoint
(what `jaxmoe.load_model` and `jaxmoe-convert export` read).

LoRA runs: the base is rebuilt as the run built it (`--model.init_from`, or the seeded random
init), the adapters are restored from the run's checkpoint and folded in, W <- W + (alpha/r) A B,
in the run's param_dtype. Full fine-tuning runs: the checkpoint's parameters and router biases.

    jaxmoe-train merge runs/ft /data/ft-merged [--step N]
    jaxmoe-convert export /data/ft-merged /data/ft-hf        # Hugging Face safetensors
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
from flax import nnx


def initial_state(cfg, tx):
    """The run's initial train state (base + fresh adapters) on one device, built by the
    trainer's own `init_state`: the same base, whichever way the run initialised it."""
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from jaxmoe.train import trainer

    mesh = Mesh(np.asarray(jax.devices()[:1]), (trainer.DATA_AXIS,))
    plan = trainer.Plan(cfg, trainer.resolve_model_config(cfg), mesh, None, None)
    sharding = NamedSharding(mesh, P())
    return trainer.init_state(plan, tx, sharding) + (sharding,)


def merged_model(workdir: str, step: int | None = None, dtype: str | None = None):
    """(the merged DeepseekV3, the step it comes from, the number of adapters folded in)."""
    from jaxmoe import lora

    model, step = trained_model(workdir, step, dtype)
    return model, step, lora.merge(model)


def trained_model(workdir: str, step: int | None = None, dtype: str | None = None):
    """(the run's model at checkpoint `step` (default: the latest) - a LoRA run's with its
    adapters attached, not folded - and that step): the one loader of a jaxmoe-train workdir
    (`jaxmoe-train merge`, `jaxmoe-generate --ckpt WORKDIR`). The architecture is the one in
    the checkpoint's own run config; `dtype` (default: the run's param_dtype) sets the parameter
    and compute dtypes. Only model parameters are read, never the optimizer state."""
    import orbax.checkpoint as ocp

    from jaxmoe.train.config import TrainConfig, TrainConfigError

    directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    if not os.path.isdir(directory):
        raise TrainConfigError(f"{workdir}: no checkpoints/ folder (not a jaxmoe-train workdir)")
    mngr = ocp.CheckpointManager(directory, item_names=("state", "meta"))
    try:
        have = sorted(mngr.all_steps())
        step = (have[-1] if have else None) if step is None else step
        if step not in have:
            raise TrainConfigError(f"{directory}: no checkpoint at step "
                                   f"{step if step is not None else '(none saved)'}; have {have}")
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        cfg = TrainConfig.from_dict(dict(meta["config"]))
        if dtype is not None:
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(
                cfg.model, param_dtype=dtype, dtype=dtype))
        build = _lora_parts if cfg.lora.rank else _full_parts
        graphdef, parts, saved, sharding = build(cfg, os.path.join(directory, str(step), "state"))
        parts = dict(parts, **_restore(mngr, step, {k: parts[k] for k in saved}, sharding))
    finally:
        mngr.close()
    return nnx.merge(graphdef, *parts.values()), step


def _full_parts(cfg, state_dir: str):
    """A full fine-tuning run: (graphdef, abstract model parts, the parts to restore - all of
    them -, their sharding). No init: every parameter comes from the checkpoint."""
    import jaxmoe
    from jaxmoe import orbax_io
    from jaxmoe.train import trainer
    from jaxmoe.train.state import split_model

    mcfg = trainer.resolve_model_config(cfg)
    if not any(n.startswith("params.mtp.") for n in orbax_io.stored_names(state_dir)):
        mcfg = mcfg.replace(num_nextn_predict_layers=0)  # e.g. init_from an HF folder w/o MTP
    graphdef, parts = split_model(nnx.eval_shape(lambda: jaxmoe.DeepseekV3(mcfg,
                                                                           rngs=nnx.Rngs(0))))
    return graphdef, parts, tuple(parts), jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _lora_parts(cfg, state_dir: str):
    """A LoRA run: (graphdef, its initial parts - the base rebuilt as the run built it, fresh
    adapters -, the part to restore - the adapters -, their sharding)."""
    from jaxmoe.train.optim import make_optimizer

    tx, _ = make_optimizer(cfg.optim, cfg.steps, cfg.stage)
    graphdef, state, sharding = initial_state(cfg, tx)
    parts = {k: state[k] for k in ("params", "biases", "frozen", "rest")}  # split_model's order
    return graphdef, parts, ("params",), sharding


def _restore(mngr, step: int, parts: dict, sharding) -> dict:
    """`parts` (arrays or abstract) read from the checkpoint's `state` item; a partial restore,
    so the optimizer moments and the RNG beside them are not read."""
    import orbax.checkpoint as ocp

    from jaxmoe.train import checkpoint as train_ckpt

    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          train_ckpt.flatten(parts))
    got = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))
    return train_ckpt.unflatten(parts, dict(got["state"]))


def output_problem(workdir: str, out: str, overwrite: bool) -> str | None:
    """Why OUT_DIR must not be written: it is (inside, or around) the workdir, a file, or a
    non-empty folder that is not a previous merge result (or one, without --overwrite)."""
    from jaxmoe import orbax_io, paths

    problem = paths.folder_problem(out)
    if problem:
        return f"OUT_DIR {out!r}: {problem}"
    where = {"is": "is", "inside": "is inside", "contains": "contains"}.get(
        paths.overlap(out, workdir))
    if where:
        return (f"OUT_DIR {out!r} {where} the run's WORKDIR {workdir!r}; replacing it would "
                "delete the run. Merge into a separate folder")
    if os.path.isdir(out) and os.listdir(out):
        if not orbax_io.is_orbax_dir(out):
            return (f"OUT_DIR {out!r} is a non-empty folder that holds no jaxmoe checkpoint; "
                    "only an empty folder or a previous merge result is replaced. Choose "
                    "another OUT_DIR")
        if not overwrite:
            return f"{out} exists (pass --overwrite to replace that checkpoint)"
    return None


def save_replacing(model, out: str, source: str) -> None:
    """Save to a temporary sibling of `out`, then swap it in: a failed save leaves the old
    `out` as it was (and no partial folder)."""
    import shutil
    import tempfile

    from jaxmoe import orbax_io, paths

    out = os.path.abspath(out)
    parent, name = os.path.split(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.merging-", dir=parent)
    os.rmdir(tmp)  # a unique name; Orbax creates the folder itself and refuses an existing one
    try:
        orbax_io.save_model(model, tmp, source=source)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    paths.replace_folder(tmp, out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="jaxmoe-train merge", description=__doc__.split("\n\n")[0])
    ap.add_argument("workdir")
    ap.add_argument("out")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace OUT_DIR when it holds a previous merge result")
    args = ap.parse_args(argv)
    from jaxmoe.config import ConfigError
    from jaxmoe.safetensors_io import CheckpointError

    def fail(msg) -> int:
        print(f"jaxmoe-train merge: error: {msg}", file=sys.stderr)
        return 2

    if os.path.exists(args.workdir) and not os.path.isdir(args.workdir):
        return fail(f"WORKDIR {args.workdir!r} is a file, not a jaxmoe-train workdir")
    problem = output_problem(args.workdir, args.out, args.overwrite)
    if problem:
        return fail(problem)
    try:
        model, step, n = merged_model(args.workdir, args.step)
    except (ConfigError, CheckpointError) as e:  # TrainConfigError included
        return fail(e)
    try:
        save_replacing(model, args.out, source=f"{os.path.abspath(args.workdir)} step {step}")
    except OSError as e:
        print(f"jaxmoe-train merge: error: saving {args.out} failed ({e}); "
              f"{args.out} is unchanged", file=sys.stderr)
        return 1
    what = f"{n} LoRA adapters folded in" if n else "full fine-tuning parameters"
    print(f"merged {args.workdir} step {step} ({what}) -> {args.out} "
          f"({jnp.dtype(model.cfg.param_dtype).name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
