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
import json
import os
import sys

import jax
import jax.numpy as jnp


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


def merged_model(workdir: str, step: int | None = None):
    """(the merged DeepseekV3, the step it comes from, the number of adapters folded in)."""
    from jaxmoe import lora

    model, step = trained_model(workdir, step)
    return model, step, lora.merge(model)


def trained_model(workdir: str, step: int | None = None):
    """(the run's model at checkpoint `step` (default: the latest) - a LoRA run's with its
    adapters attached, not folded - and that step)."""
    from flax import nnx

    from jaxmoe.train.checkpoint import Checkpointer, saved_part
    from jaxmoe.train.config import TrainConfig, TrainConfigError
    from jaxmoe.train.optim import make_optimizer

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise TrainConfigError(f"{workdir}: no config.json (not a jaxmoe-train workdir)")
    with open(path) as f:
        cfg = TrainConfig.from_dict(json.load(f))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), 0, 1 << 20, False)  # keep all
    step = ckpt.latest_step() if step is None else step
    if step is None or step not in ckpt.mngr.all_steps():
        raise TrainConfigError(f"{workdir}/checkpoints: no checkpoint at step "
                               f"{step if step is not None else '(none saved)'}; have "
                               f"{sorted(ckpt.mngr.all_steps())}")
    tx, _ = make_optimizer(cfg.optim, cfg.steps, cfg.stage)
    graphdef, state, sharding = initial_state(cfg, tx)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                            saved_part(state))
    restored, _ = ckpt.restore(step, abstract)
    ckpt.close()
    state = dict(state, **restored)
    parts = [state["params"], state["biases"], state["rest"]]
    if "frozen" in state:
        parts.append(state["frozen"])
    return nnx.merge(graphdef, *parts), step


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="jaxmoe-train merge", description=__doc__.split("\n\n")[0])
    ap.add_argument("workdir")
    ap.add_argument("out")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    from jaxmoe import orbax_io
    from jaxmoe.train.config import TrainConfigError

    if os.path.exists(args.out) and os.listdir(args.out) and not args.overwrite:
        print(f"jaxmoe-train merge: error: {args.out} exists (pass --overwrite)", file=sys.stderr)
        return 2
    try:
        model, step, n = merged_model(args.workdir, args.step)
    except TrainConfigError as e:
        print(f"jaxmoe-train merge: error: {e}", file=sys.stderr)
        return 2
    if os.path.exists(args.out):
        import shutil

        shutil.rmtree(args.out)
    orbax_io.save_model(model, args.out, source=f"{os.path.abspath(args.workdir)} step {step}")
    what = f"{n} LoRA adapters folded in" if n else "full fine-tuning parameters"
    print(f"merged {args.workdir} step {step} ({what}) -> {args.out} "
          f"({jnp.dtype(model.cfg.param_dtype).name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
