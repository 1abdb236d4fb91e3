"""One process of tests/test_multihost.py: `python multihost_child.py PORT PROCESS_ID OUT_DIR`.

4 CPU devices per process, 2 processes, jax.distributed with gloo collectives; the cpu-2x4 preset
(dcn = process, experts and FSDP across both). Each process reads only its own token rows and
builds the global batch from them; the sharded forward+backward runs; process 0 writes the
gathered loss, logits and gradients to OUT_DIR/result.npz.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def process_rows(sharding, global_shape: tuple[int, ...]) -> slice:
    """The contiguous rows of a global array that this process's devices hold (what a
    per-process data loader reads)."""
    idx = sharding.addressable_devices_indices_map(global_shape)
    spans = {s[0].indices(global_shape[0])[:2] for s in idx.values()}
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    assert sum(b - a for a, b in spans) == hi - lo, f"rows not contiguous: {sorted(spans)}"
    return slice(lo, hi)


def main(port: str, pid: str, out: str) -> None:
    from jaxmoe.parallel import distributed

    plan = distributed.init_distributed(f"127.0.0.1:{port}", 2, int(pid), "gloo")
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    import pjit_configs
    import shard_util as U

    jax.config.update("jax_default_matmul_precision", "highest")
    assert jax.process_count() == 2 and jax.local_device_count() == 4, plan.describe()
    layout = pjit_configs.load("cpu-2x4")
    cfg = U.tiny_cfg()
    graphdef, params, rest = U.host_parts(cfg)

    def place(tree, shardings):
        return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: x[i]),
                            tree, shardings)

    psh = layout.shardings(params)
    sparams = place(params, psh)
    srest = place(rest, jax.tree.map(lambda _: layout.replicated, rest))
    # per-process data loading: this process reads only the rows its devices hold
    bsh = layout.batch_sharding()
    shape = (U.B, U.T + 1)
    rows = process_rows(bsh, shape)
    local = U.tokens(cfg.vocab_size)[rows]  # stands in for a loader reading rows lo:hi
    tok = jax.make_array_from_process_local_data(bsh, local, shape)
    assert not tok.is_fully_addressable
    with layout.scope():
        (loss, logits), grads = U.make_step(graphdef, out_shardings=((None, None), psh))(
            sparams, srest, tok)
    # every process holds only its shards of the expert weights' gradients
    g = grads["moe_layers"]["ffn"]["w_up_EDF"].get_value()
    assert not g.is_fully_addressable
    logits, grads = multihost_utils.process_allgather((logits, grads), tiled=True)
    if jax.process_index() == 0:
        np.savez(os.path.join(out, "result.npz"), loss=np.asarray(loss), logits=logits,
                 rows=np.array([rows.start, rows.stop]),
                 **{f"g:{k}": v for k, v in U.flat(grads).items()})
    multihost_utils.sync_global_devices("done")
    print(f"process {jax.process_index()}: rows {rows.start}:{rows.stop}, {plan.describe()}",
          flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
