"""Training checkpoints with Orbax's CheckpointManager: async saves every K steps, the newest
N kept, exact resume.

When to save is decided here, not by Orbax's default policy (which also saves the first step
it is offered when the folder holds no checkpoint yet - a full extra write after step 1): a
step is saved when it is a multiple of `--ckpt.every` (`is_periodic`) or when the trainer
forces it (the last step, a preemption, the end of `--run_steps`). A run that dies before its
first save restarts from scratch.

Each step folder holds two items: `state`, the whole train state (params, optimizer moments,
router biases, RNG key, step; a LoRA run's adapters only, see `saved_part`) as a flat dict keyed
by the pytree path joined with "." (so the layout does not depend on optax's or nnx's container
types), and `meta`, JSON with the data position (`consumed` global rows), the corpus fingerprint
and the run config. A save is only
visible once Orbax has finalised it, so a run killed mid-save resumes from the previous one.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

NEVER = 1 << 62


def key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def flatten(tree) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    out = {".".join(key_name(k) for k in path): v for path, v in leaves}
    if len(out) != len(leaves):
        raise ValueError("train-state paths collide when flattened")
    return out


def unflatten(template, flat: dict):
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    return jax.tree_util.tree_unflatten(treedef, [flat[".".join(key_name(k) for k in p)]
                                                  for p, _ in paths])


# What a LoRA run saves: the adapters, their optimizer moments, the RNG and the step. The frozen
# base (and the router biases, which LoRA runs do not update) come back from --model.init_from.
LORA_SAVED = ("params", "opt", "rng", "step")


def saved_part(state: dict) -> dict:
    """The part of the train state a checkpoint holds: all of it, or for a LoRA run (whose
    state has a "frozen" base) only `LORA_SAVED`."""
    if "frozen" not in state:
        return state
    return {k: state[k] for k in LORA_SAVED}


def is_periodic(step: int, every: int) -> bool:
    """A periodic save at `step`: a multiple of `every` (> 0; 0 = no periodic saves)."""
    return every > 0 and step > 0 and step % every == 0


class Checkpointer:
    def __init__(self, directory: str, every: int, keep: int, async_save: bool):
        self.directory = os.path.abspath(directory)
        self.every = every
        # Orbax's own policy only matters to callers of mngr.should_save; `save` decides itself
        # (Orbax's default would add an initial save and one at its preemption sync point).
        policy = ocp.checkpoint_managers.FixedIntervalPolicy(every if every > 0 else NEVER)
        opts = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_decision_policy=policy,
            enable_async_checkpointing=async_save, create=True)
        self.mngr = ocp.CheckpointManager(self.directory, options=opts,
                                          item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.mngr.latest_step()

    def save(self, step: int, state, meta: dict, force: bool = False) -> bool:
        """Save `step` if it is periodic or `force`d; True when a save was started."""
        if not (force or is_periodic(step, self.every)):
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(flatten(state)),
                                  meta=ocp.args.JsonSave(meta))
        return self.mngr.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state) -> tuple[object, dict]:
        """`abstract_state`: the state's pytree of jax.ShapeDtypeStruct with target shardings."""
        target = flatten(abstract_state)
        got = self.mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return unflatten(abstract_state, got["state"]), dict(got["meta"])

    def reached_preemption(self, step: int) -> bool:
        """Whether JAX's preemption service saw a SIGTERM on any process (multi-host runs)."""
        return bool(self.mngr.reached_preemption(step))

    def wait(self) -> None:
        self.mngr.wait_until_finished()

    def close(self) -> None:
        self.mngr.wait_until_finished()
        self.mngr.close()
