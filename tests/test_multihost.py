"""A real multi-process run: 2 local processes x 4 CPU devices with jax.distributed and gloo
collectives run the sharded forward+backward of the tiny model under the cpu-2x4 preset
(experts and FSDP across the processes, each loading only its own rows) and agree with the
single-process result. Also: where the coordinator comes from (flags, environment, cluster
auto-detection)."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import shard_util as U
from jaxmoe.parallel import distributed as D

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_gloo_equal_one_process(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "multihost_child.py"),
                               str(port), str(i), str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    # the reference while the children run: one process, one device
    cfg = U.tiny_cfg()
    graphdef, params, rest = U.host_parts(cfg)
    dev = jax.devices()[0]
    (loss0, logits0), grads0 = U.make_step(graphdef)(
        *(jax.device_put(t, dev) for t in (params, rest, U.tokens(cfg.vocab_size))))
    grads0 = U.flat(grads0)
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=TIMEOUT))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            outs.append(p.communicate())
            pytest.fail(f"multi-process child timed out after {TIMEOUT}s:\n" + outs[-1][1][-4000:])
    for i, (p, (o, e)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i} failed:\n{o[-2000:]}\n{e[-6000:]}"
    assert "rows 0:4" in outs[0][0] and "rows 4:8" in outs[1][0], outs
    r = np.load(tmp_path / "result.npz")
    np.testing.assert_allclose(float(r["loss"]), float(loss0), rtol=1e-5)
    np.testing.assert_allclose(r["logits"], np.asarray(logits0), rtol=1e-5, atol=1e-6)
    got = {k[2:]: r[k] for k in r.files if k.startswith("g:")}
    assert got.keys() == grads0.keys()
    for k, g0 in grads0.items():
        err = np.abs(got[k] - g0).max() / max(np.abs(g0).max(), 1e-6)
        assert err < 1e-5, (k, err)


def test_coordinator_from_flags_env_or_cluster():
    assert D.resolve(env={}).mode == "single"
    p = D.resolve("10.0.0.1:1234", 4, 2, env={})
    assert (p.mode, p.coordinator, p.num_processes, p.process_id) == ("explicit", "10.0.0.1:1234",
                                                                      4, 2)
    env = {D.ENV_COORDINATOR: "h:9", D.ENV_NUM_PROCESSES: "8", D.ENV_PROCESS_ID: "7"}
    p = D.resolve(env=env)
    assert (p.coordinator, p.num_processes, p.process_id) == ("h:9", 8, 7)
    assert "JAXMOE_COORDINATOR" in p.source
    assert D.resolve("x:1", 2, 0, env=env).coordinator == "x:1"  # flags win over the environment
    assert D.resolve("auto", env={}).mode == "auto"
    tpu = D.resolve(env={"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"})
    assert tpu.mode == "auto" and "4 hosts" in tpu.source
    assert D.resolve(env={"TPU_WORKER_HOSTNAMES": "localhost"}).mode == "single"  # one host
    assert D.resolve(env={"SLURM_JOB_ID": "1", "SLURM_NTASKS": "16"}).mode == "auto"
    assert D.resolve(env={"MEGASCALE_COORDINATOR_ADDRESS": "c:8080"}).mode == "auto"
    with pytest.raises(D.DistributedError, match="JAXMOE_NUM_PROCESSES"):
        D.resolve(env={D.ENV_COORDINATOR: "h:9"})
    with pytest.raises(D.DistributedError, match="host:port"):
        D.resolve("nohost", 2, 0, env={})
    with pytest.raises(D.DistributedError, match=r"process id 2 must be in \[0, num_processes=2\)"):
        D.resolve("h:1", 2, 2, env={})
