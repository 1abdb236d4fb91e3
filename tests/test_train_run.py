"""jaxmoe-train end to end, as subprocesses: the loss falls on the built-in corpus; SIGTERM
saves and exits 0; kill -9 + resume continues bitwise like an uninterrupted run; a 2-process
jax.distributed (gloo) run computes the same router-bias update as one process."""

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from jaxmoe.train.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tiny-debug (2 layers, 8 x 32 rows; MTP off: its path has unit tests and doubles the compile)
# on 2 CPU devices; eval every 10 steps
STEPS = 60
BASE = ["--config", "tiny-debug", "--steps", str(STEPS), "--ckpt.every", "10", "--ckpt.keep", "2",
        "--log.eval_every", "20", "--loss.mtp_weight", "0"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One XLA compilation cache for these runs: each program compiles once."""
    return str(tmp_path_factory.mktemp("xla_cache"))


def env_for(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
    return env


def cmd(workdir, cache, *extra):
    return [sys.executable, "-m", "jaxmoe.train", *BASE, "--workdir", str(workdir),
            "--compile_cache", cache, *extra]


def run(workdir, cache, *extra, devices=2, timeout=300):
    p = subprocess.run(cmd(workdir, cache, *extra), capture_output=True, text=True,
                       env=env_for(devices), cwd=REPO, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def metrics(workdir) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    return read_metrics(path) if os.path.exists(path) else []


def start(workdir, cache, *extra, devices=2):
    return subprocess.Popen(cmd(workdir, cache, *extra), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env_for(devices), cwd=REPO)


def start_and_signal(workdir, cache, sig, at_step, timeout=300, saved=None):
    """Start a run, send `sig` once metrics.jsonl reaches `at_step` (and, with `saved`, once the
    checkpoint of that step is finalised); returns (proc, out, err)."""
    p = start(workdir, cache)
    t = time.time()
    while time.time() - t < timeout and p.poll() is None:
        m = metrics(workdir)
        if m and m[-1]["step"] >= at_step and (
                saved is None or (os.path.isdir(workdir / "checkpoints")
                                  and saved in steps_of(workdir))):
            p.send_signal(sig)
            break
        time.sleep(0.01)
    out, err = p.communicate(timeout=timeout)
    return p, out, err


def steps_of(workdir):
    ck = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(ck) if d.isdigit())


@pytest.fixture(scope="module")
def ref_run(tmp_path_factory, cache):
    """The uninterrupted reference run: 1 process x 2 devices, one microbatch."""
    ref = tmp_path_factory.mktemp("ref")
    return ref, run(ref, cache)


def test_loss_falls_kill9_resume_is_bitwise_sigterm_saves(tmp_path, cache, ref_run):
    run_b = tmp_path / "b"
    ref, p = ref_run
    m = metrics(ref)
    assert [r["step"] for r in m] == list(range(1, STEPS + 1))
    loss = np.array([r["loss"] for r in m])
    assert loss[-5:].mean() < loss[:5].mean() - 1.0, loss  # bytes: ~5.5 nats -> under 4
    ev = [r["eval_loss"] for r in m if "eval_loss" in r]
    assert len(ev) == 3 and ev[-1] < ev[0] < loss[0]
    for k in ("tokens_per_s", "mfu", "load_max_over_mean", "dead_experts", "router_bias_norm",
              "balance_loss", "grad_norm", "lr", "expert_counts", "router_bias"):
        assert k in m[-1], k
    assert "eval" in p.stdout and "tok/s" in p.stdout and "MFU" in p.stdout
    assert steps_of(ref) == [50, 60]
    events = [(s, v) for s, v in tb_scalars(ref / "tb") if "loss" in v]
    assert [s for s, _ in events] == list(range(1, STEPS + 1))
    assert [v["loss"] for _, v in events] == [np.float32(r["loss"]) for r in m]

    # kill -9 mid-run: no chance to save; the last periodic checkpoint (10) survives
    p, out, err = start_and_signal(run_b, cache, signal.SIGKILL, 14, saved=10)
    assert p.returncode == -signal.SIGKILL, "finished before the kill"
    assert metrics(run_b)[-1]["step"] < STEPS
    assert all(s % 10 == 0 for s in steps_of(run_b)), steps_of(run_b)  # no step-1 save
    # resume (dropping the metrics lines past the checkpoint), then SIGTERM: saves, exits 0
    p, out, err = start_and_signal(run_b, cache, signal.SIGTERM, 32)
    assert p.returncode == 0, err[-3000:]
    assert "resumed from" in out and "preempted" in out
    mb = metrics(run_b)
    stopped = mb[-1]["step"]
    assert 32 <= stopped < STEPS and steps_of(run_b)[-1] == stopped
    # the continued metrics equal the uninterrupted run's, bit for bit
    assert [r["step"] for r in mb] == list(range(1, stopped + 1))
    for a, b in zip(m, mb):
        for k in ("loss", "balance_loss", "grad_norm", "lr", "router_bias", "expert_counts",
                  "eval_loss"):
            assert a.get(k) == b.get(k), (a["step"], k, a.get(k), b.get(k))
    assert len(os.listdir(run_b / "tb")) == 2  # one event file per run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tb_scalars(logdir):
    from jaxmoe.train import tb

    return [tb.parse_event(r) for name in sorted(os.listdir(logdir))
            for r in tb.read_records(os.path.join(logdir, name))]


def test_two_process_gloo_bias_update_equals_one_process(tmp_path, cache, ref_run):
    """2 processes x 1 device, the batch sharded across them in 2 accumulated microbatches, vs
    the reference run (1 process x 2 devices, one microbatch): the same global expert counts
    and the same router-bias updates, bit for bit; the same losses up to summation order."""
    port = free_port()
    procs = [start(tmp_path / "multi", cache, "--run_steps", "3", "--data.grad_accum", "2",
                   "--dist.coordinator", f"127.0.0.1:{port}", "--dist.num_processes", "2",
                   "--dist.process_id", str(i), devices=1) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, o[-2000:] + e[-3000:]
    assert "2 cpu device(s) in 2 process(es)" in outs[0][0] and "run_steps 3 done" in outs[0][0]
    assert "x2 accum" in outs[0][0]
    mm, ms = metrics(tmp_path / "multi"), metrics(ref_run[0])[:3]
    assert [r["step"] for r in mm] == [r["step"] for r in ms] == [1, 2, 3]
    assert np.abs(mm[-1]["router_bias"]).max() > 0
    for a, b in zip(mm, ms):
        assert a["expert_counts"] == b["expert_counts"], a["step"]
        assert a["router_bias"] == b["router_bias"], a["step"]
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)
