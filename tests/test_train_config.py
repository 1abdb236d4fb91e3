"""jaxmoe-train's run config and command line: typed overrides, --help, and clear errors for
bad configurations before anything is compiled."""

import os
import subprocess
import sys

import pytest

from jaxmoe.train import trainer
from jaxmoe.train.config import TrainConfigError
from jaxmoe.train.runs import get_run
from jaxmoe.train.flags import parse_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_overrides_are_typed_and_nested():
    cfg = parse_args(["--config", "tiny", "--steps", "50", "--workdir", "/tmp/x",
                      "--optim.lr", "1e-3", "--data.batch-size", "32", "--ckpt.async_save", "false",
                      "--model.overrides", "hidden_size=96,q_lora_rank=none"])
    assert cfg.steps == 50 and cfg.workdir == "/tmp/x" and cfg.optim.lr == 1e-3
    assert cfg.data.batch_size == 32 and cfg.ckpt.async_save is False
    assert trainer.resolve_model_config(cfg).hidden_size == 96
    assert trainer.resolve_model_config(cfg).q_lora_rank is None
    assert parse_args(["--config", "tiny_debug"]).data.seq_len == 32


@pytest.mark.parametrize("argv, match", [
    (["--config", "nope"], "unknown run"),
    (["--optim.learning_rate", "1"], "unknown flag"),
    (["--steps", "ten"], "not a valid int"),
    (["--ckpt.async_save", "maybe"], "expected true or false"),
    (["--mesh.name", "fsdp_ep"], "unknown mesh preset"),
    (["--data.batch_size", "10", "--data.grad_accum", "4"], "divisible by data.grad_accum"),
    (["--data.source", "memmap"], "needs a file"),
    (["--model.overrides", "hidden=3"], "no field 'hidden'"),
])
def test_bad_flags_name_the_problem(argv, match):
    with pytest.raises(TrainConfigError, match=match):
        parse_args(argv)


@pytest.mark.parametrize("argv, match", [
    (["--optim.lr", "inf"], r"--optim.lr=inf: must be a finite number"),
    (["--optim.weight_decay", "nan"], r"--optim.weight_decay=nan: must be a finite number"),
    (["--mesh.capacity_factor", "inf"], r"--mesh.capacity_factor=inf: must be a finite"),
    (["--optim.b1", "1.5"], r"--optim.b1=1.5: must be in \[0, 1\)"),
    (["--optim.b2", "1"], r"--optim.b2=1.0: must be in \[0, 1\)"),
    (["--optim.eps", "-1"], r"--optim.eps=-1.0: must be positive"),
    (["--optim.moments_dtype", "float16"], r"--optim.moments_dtype='float16': must be one of"),
    (["--loss.mtp_switch", "3"], r"--loss.mtp_switch=3.0: a fraction of --steps: in \[0, 1\]"),
    (["--loss.bias_update_stop", "-0.1"], r"--loss.bias_update_stop=-0.1: a fraction"),
    (["--log.sample_bytes", "-5"], r"--log.sample_bytes=-5: must be >= 0"),
    (["--log.peak_tflops", "-1"], r"--log.peak_tflops=-1.0: must be >= 0"),
    (["--seed", "-1"], r"--seed=-1: must be >= 0"),
    (["--ckpt.keep", "0"], r"--ckpt.keep=0: must be >= 1"),
    (["--data.max_bytes", "-1"], r"--data.max_bytes=-1: must be >= 0"),
    (["--steps", "25e-1"], r"--steps='25e-1': not a valid int \(25e-1 is not a whole number\)"),
    (["--data.batch_size", "1.5"], r"--data.batch_size='1.5': not a valid int"),
    (["--steps", "inf"], r"--steps='inf': not a valid int"),
    (["--data.bin_dtype", "uint17"], r"--data.bin_dtype='uint17': must be one of .*'uint16'"),
    (["--model.param_dtype", "float64x"], r"^--model.param_dtype='float64x': must be one of"),
    (["--model.dtype", "f32"], r"^--model.dtype='f32': must be one of .*'bfloat16'"),
    (["--model.moe_impl", "bogus"], r"^--model.moe_impl='bogus': must be one of .*'ragged_dot'"),
    (["--dist.cpu_collectives", "bogus"], r"--dist.cpu_collectives='bogus': must be one of"),
])
def test_nonsense_values_name_their_flag(argv, match):
    with pytest.raises(TrainConfigError, match=match):
        parse_args(["--config", "tiny-debug"] + argv)
    with pytest.raises(TrainConfigError, match=match):  # --print-config shows no bad config
        parse_args(["--config", "tiny-debug", "--print-config"] + argv)


def test_whole_number_ints_and_model_flag_errors():
    cfg = parse_args(["--config", "tiny-debug", "--steps", "1e3", "--data.batch_size", "16.0"])
    assert (cfg.steps, cfg.data.batch_size) == (1000, 16)
    # an override of the same field is the --model.overrides flag's fault
    with pytest.raises(TrainConfigError, match=r"^--model.overrides: ModelConfig.moe_impl='x'"):
        trainer.resolve_model_config(parse_args(["--model.overrides", "moe_impl=x"]))


@pytest.mark.parametrize("argv, match", [
    (["--model.preset", "deepseek_v9"], "--model.preset.*unknown model preset"),
    (["--mesh.data", "3"], "--mesh.data=3: mesh 'auto' must span all 8 devices"),
    (["--data.batch_size", "12"], "--data.batch_size=12.*do not divide over 8 data shards"),
    (["--data.batch_size", "16", "--data.grad_accum", "4"], "4 microbatch.*of 4 rows"),
    (["--data.source", "memmap", "--data.path", "/nonexistent/tokens.bin"], "no such file"),
    (["--model.init_from", "/nonexistent/ckpt"], "no such folder"),
    (["--model.overrides", "n_group=3"], "--model.overrides.*n_routed_experts"),
    (["--data.seq_len", "1024"], "max_position_embeddings"),
])
def test_bad_runs_fail_in_prepare_before_compiling(argv, match):
    cfg = parse_args(["--config", "tiny-debug"] + argv)  # 8 CPU devices here (conftest)
    with pytest.raises(TrainConfigError, match=match):
        trainer.prepare(cfg)


# `jaxmoe-train` (jaxmoe.train.cli.main) with trainer.init_state recorded instead of run, and
# XLA backend compiles counted; prints both counts to stderr on the way out.
CLI_PROBE = """
import sys
import jax.monitoring
from jaxmoe.train import cli, trainer
seen = {"init_state": 0, "compiles": 0}
def on_event(name, secs, **kw):
    if name.endswith("backend_compile_duration"):
        seen["compiles"] += 1
jax.monitoring.register_event_duration_secs_listener(on_event)
def init_state(*a, **k):
    seen["init_state"] += 1
    raise SystemExit("probe: init_state reached")
trainer.init_state = init_state
try:
    rc = cli.main(sys.argv[1:])
finally:
    print(f"probe: init_state {seen['init_state']}, xla compiles {seen['compiles']}",
          file=sys.stderr)
sys.exit(rc)
"""


def test_cli_help_lists_flags_and_errors_exit_2(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-m", "jaxmoe.train", "--config", "tiny", "--help"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert out.returncode == 0
    for flag in ("--steps", "--workdir", "--model.preset", "--mesh.name", "--data.source",
                 "--optim.lr", "--loss.bias_update_speed", "--ckpt.every", "--log.eval_every"):
        assert flag in out.stdout
    # a field comment that continues on the next source line is shown whole
    help_text = " ".join(out.stdout.split())
    assert "h100-<N>x8, ...: parameters + optimizer state sharded" in help_text
    assert "ragged_a2a | allgather | none" in help_text
    # the real CLI in a fresh process, with the model's initialisation replaced by a recorder
    # and every XLA compile counted: a bad config exits 2 before either happens
    bad = subprocess.run([sys.executable, "-c", CLI_PROBE, "--config", "tiny",
                          "--data.source", "jsonl", "--data.path", str(tmp_path / "missing.jsonl"),
                          "--data.tokenizer", str(tmp_path / "tok.json"),
                          "--workdir", str(tmp_path / "w")],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert bad.returncode == 2, bad.stderr
    assert "--data.path" in bad.stderr and "no such file" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert "probe: init_state 0, xla compiles 0" in bad.stderr, bad.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_named_runs_validate():
    for name in ("tiny", "tiny-debug", "bench-small", "v2-lite-finetune"):
        cfg = get_run(name)
        if cfg.data.source == "jsonl":
            cfg = cfg.replace(data=cfg.data.__class__(**{**cfg.data.__dict__, "path": "x",
                                                        "tokenizer": "y"}))
        cfg.validate()
        trainer.resolve_model_config(cfg)


def test_init_from_refuses_shape_changing_overrides(tmp_path):
    import parity_util as pu

    ckpt = str(pu.saved("v3"))
    base = ["--model.init_from", ckpt, "--workdir", str(tmp_path), "--data.seq_len", "16",
            "--data.batch_size", "8"]
    with pytest.raises(TrainConfigError, match=r"init_from.*num_hidden_layers"):
        trainer.resolve_model_config(parse_args(["--config", "tiny", "--model.overrides", "num_hidden_layers=1"] + base))
    # runtime-only overrides keep the checkpoint's shapes and are accepted
    mcfg = trainer.resolve_model_config(parse_args(["--config", "tiny", "--model.overrides", "moe_impl=dense"] + base))
    assert mcfg.moe_impl == "dense"
    assert mcfg.num_hidden_layers == pu.load(pu.saved("v3")).cfg.num_hidden_layers
