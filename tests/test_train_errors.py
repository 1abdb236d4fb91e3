"""jaxmoe-train refuses, with a clear error and exit 2 (before anything is initialised or
compiled), what would lose or mix up work: `merge` into (or around) its own workdir or over a
folder that is not a previous merge result, paths that are files, a workdir holding another
model's or another run's checkpoints, `--dist.*` flags that would be ignored, a corrupt
`--model.init_from` shard; resuming a finished run does nothing and leaves its config.json."""

import json
import os

import numpy as np
import pytest
from flax import nnx

import jaxmoe
from jaxmoe import hf_io, orbax_io, safetensors_io
from jaxmoe.parallel import distributed as D
from jaxmoe.train import state as train_state, trainer, workdir
from jaxmoe.train.checkpoint import Checkpointer, saved_part
from jaxmoe.train.cli import main as train_main
from jaxmoe.train.config import TrainConfigError
from jaxmoe.train.flags import parse_args
from jaxmoe.train.merge import main as merge_main
from jaxmoe.train.optim import make_optimizer

STEPS = 2


def argv_for(workdir, *extra):
    return ["--config", "tiny-debug", "--steps", str(STEPS), "--workdir", str(workdir),
            "--compile_cache", "", "--log.tensorboard", "false", *extra]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny-debug workdir as a finished `--steps 2` run leaves it (a full train state at
    step 2 written by the trainer's Checkpointer with its checkpoint meta, and config.json),
    plus the same model as a Hugging Face folder: (workdir, hf folder, train state)."""
    root = tmp_path_factory.mktemp("train_errors")
    wd = root / "run"
    cfg = parse_args(argv_for(wd))
    plan = trainer.prepare(cfg)
    graphdef, abstract = train_state.split_model(
        nnx.eval_shape(lambda: jaxmoe.DeepseekV3(plan.mcfg, rngs=nnx.Rngs(0))))
    parts = train_state.host_init(abstract, plan.mcfg, cfg.seed)
    tx, _ = make_optimizer(cfg.optim, cfg.steps)
    state = dict(parts, opt=tx.init(parts["params"]), rng=np.zeros(2, np.uint32),
                 step=np.int32(STEPS))
    ck = Checkpointer(str(wd / "checkpoints"), 1, 3, False)
    ck.save(STEPS, saved_part(state), workdir.checkpoint_meta(cfg, plan.train, 8 * STEPS),
            force=True)
    ck.close()
    (wd / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    hf = root / "hf"
    hf.mkdir()
    model = nnx.merge(graphdef, *parts.values())
    safetensors_io.write(hf / "model.safetensors", hf_io.state_to_hf(plan.mcfg, nnx.state(model)))
    (hf / "config.json").write_text(json.dumps(plan.mcfg.to_hf_config()))
    return wd, hf, parts


def listing(path):
    return sorted(os.path.relpath(os.path.join(d, f), path)
                  for d, _, files in os.walk(path) for f in files)


# -------------------------------------------------------------------------------- merge
def test_merge_never_replaces_its_workdir_or_a_foreign_folder(run, tmp_path, capsys):
    wd, _, _ = run
    before = listing(wd)
    for out, where in [(wd, "is the run's WORKDIR"), (wd / "checkpoints", "is inside"),
                       (wd.parent, "contains")]:
        assert merge_main([str(wd), str(out), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert where in err and "separate folder" in err, err
    assert listing(wd) == before
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert merge_main([str(wd), str(other), "--overwrite"]) == 2
    assert "holds no jaxmoe checkpoint" in capsys.readouterr().err
    assert (other / "keep.txt").read_text() == "mine"


def test_merge_replaces_a_previous_result_atomically(run, tmp_path, capsys, monkeypatch):
    wd, _, parts = run
    out = tmp_path / "merged"
    (out).mkdir()  # an empty folder is fine
    assert merge_main([str(wd), str(out)]) == 0
    marker = (out / orbax_io.MARKER).read_text()
    assert f"{wd} step {STEPS}" in json.loads(marker)["source"]
    got = nnx.state(jaxmoe.load_model(out, mtp=False), nnx.Param)["embed_VD"].get_value()
    np.testing.assert_array_equal(got, parts["params"]["embed_VD"].get_value())
    assert merge_main([str(wd), str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err

    def failing_save(model, path, source=None):  # the disk fills up half-way
        os.makedirs(path)
        open(os.path.join(path, "partial"), "w").close()
        raise OSError(28, "No space left on device")

    before = listing(out)
    monkeypatch.setattr(orbax_io, "save_model", failing_save)
    assert merge_main([str(wd), str(out), "--overwrite"]) == 1
    assert "No space left" in capsys.readouterr().err
    assert listing(out) == before and (out / orbax_io.MARKER).read_text() == marker
    assert os.listdir(tmp_path) == ["merged"]  # no temporary sibling left behind
    monkeypatch.undo()
    assert merge_main([str(wd), str(out), "--overwrite"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["merged"] and orbax_io.is_orbax_dir(out)


def test_paths_that_are_files_are_named(run, tmp_path, capsys):
    wd, _, _ = run
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, what in [(afile, f"{afile} is a file"), (afile / "sub", f"{afile} (above it)")]:
        assert merge_main([str(wd), str(out)]) == 2
        err = capsys.readouterr().err
        assert what in err and "Traceback" not in err, err
    assert merge_main([str(afile), str(tmp_path / "out")]) == 2
    assert f"WORKDIR {str(afile)!r} is a file" in capsys.readouterr().err
    for w in (afile, afile / "w"):
        assert train_main(argv_for(w)) == 2
        err = capsys.readouterr().err
        assert f"jaxmoe-train: error: --workdir={str(w)!r}: {afile}" in err, err
        assert "is a file, not a folder" in err
    assert afile.read_text() == "x"


# ----------------------------------------------------------------------- resuming a workdir
def test_workdir_of_another_model_is_refused_before_init(run):
    wd, _, _ = run
    cfg = parse_args(argv_for(wd, "--steps", "4", "--model.overrides",
                              "num_hidden_layers=3,hidden_size=96"))
    with pytest.raises(TrainConfigError) as e:
        trainer.run(cfg)
    msg = str(e.value)
    assert f"--workdir={str(wd)!r}" in msg and "different model" in msg, msg
    assert "hidden_size 64 -> 96" in msg and "num_hidden_layers 2 -> 3" in msg, msg
    cfg = parse_args(argv_for(wd, "--steps", "4", "--lora.rank", "4"))
    with pytest.raises(TrainConfigError, match=r"different model: lora.rank 0 -> 4"):
        trainer.run(cfg)
    # dispatch and compute dtype keep the parameter shapes: that run resumes
    cfg = parse_args(argv_for(wd, "--model.moe_impl", "dense", "--model.dtype", "bfloat16"))
    assert workdir.check_workdir(cfg, trainer.resolve_model_config(cfg),
                                  trainer.resolve_model_config) == STEPS


def test_resume_false_over_checkpoints_is_refused(run, tmp_path):
    wd, _, _ = run
    with pytest.raises(TrainConfigError, match=r"--ckpt.resume=false, but --workdir=.* already "
                                               r"holds checkpoints \(steps \[2\]\).*fresh"):
        trainer.run(parse_args(argv_for(wd, "--steps", "4", "--ckpt.resume", "false")))
    fresh = parse_args(argv_for(tmp_path / "new", "--ckpt.resume", "false"))
    assert workdir.check_workdir(fresh, trainer.resolve_model_config(fresh),
                                  trainer.resolve_model_config) is None


def test_finished_run_does_nothing_and_keeps_its_config(run, capsys):
    wd, _, _ = run
    before = (wd / "config.json").read_text()
    for steps in ("2", "1"):
        assert train_main(argv_for(wd, "--steps", steps)) == 0
        out = capsys.readouterr().out
        assert f"already at step 2 >= --steps {steps}: nothing to do" in out, out
    assert (wd / "config.json").read_text() == before
    assert not (wd / "metrics.jsonl").exists()


# ------------------------------------------------------------------------- init_from, dist
def test_corrupt_init_from_shard_is_a_clean_error(run, tmp_path, capsys):
    _, hf, _ = run
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((hf / "config.json").read_text())
    data = (hf / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:len(data) // 2])
    rc = train_main(argv_for(tmp_path / "w", "--model.init_from", str(bad),
                             "--model.overrides", ""))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"jaxmoe-train: error: --model.init_from={str(bad)!r}" in err
    assert "model.safetensors: truncated" in err and "Traceback" not in err


def test_dist_flags_without_a_coordinator_are_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(D.ENV_COORDINATOR, raising=False)
    assert train_main(argv_for(tmp_path / "w", "--dist.num_processes", "2")) == 2
    err = capsys.readouterr().err
    assert "error: --dist.num_processes=2 needs a coordinator" in err, err
    assert not (tmp_path / "w").exists()
    with pytest.raises(D.DistributedError, match="--dist.process_id=1 needs a coordinator"):
        D.resolve("", None, 1, env={"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2"})
    env = {D.ENV_COORDINATOR: "h:9", D.ENV_NUM_PROCESSES: "2", D.ENV_PROCESS_ID: "1"}
    assert D.resolve("", 2, 1, env=env).coordinator == "h:9"  # the launcher's values agree
    with pytest.raises(D.DistributedError, match=r"--dist.num_processes=4 disagrees with "
                                                 r"\$JAXMOE_NUM_PROCESSES='2'"):
        D.resolve("", 4, 1, env=env)
    with pytest.raises(D.DistributedError, match=r"--dist.cpu_collectives='bogus'"):
        D.init_distributed("h:1", 2, 0, "bogus", env={})
