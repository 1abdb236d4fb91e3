"""The training run: distributed init, checks, model and state on the mesh, the loop,
checkpoints, eval, metrics, preemption.

Order matters: `prepare()` does every check that needs the devices or the data (mesh vs
devices, batch divisibility, data paths, vocab) before anything is initialised or compiled.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import time

import jax
import numpy as np
from jax.sharding import Mesh

import jaxmoe
from jaxmoe.config import ConfigError, ModelConfig
from jaxmoe.parallel import distributed
from jaxmoe.paths import folder_problem
from jaxmoe.parallel.sharding import Layout
from jaxmoe.train import batches
from jaxmoe.train import data as data_lib
from jaxmoe.train import metrics as metrics_lib
from jaxmoe.train.metrics import log
from jaxmoe.train.checkpoint import Checkpointer, saved_part
from jaxmoe.train.config import TrainConfig, TrainConfigError, model_overrides
from jaxmoe.train.optim import make_optimizer
from jaxmoe.train.state import abstract_of, init_state
from jaxmoe.train.step import DETAIL_MAX, StepFns
from jaxmoe.train.workdir import changed_fields, check_workdir, checkpoint_meta, param_shapes

DATA_AXIS = "data"


def setup_jax(cfg: TrainConfig) -> None:
    """Process-wide JAX settings, before any computation: the persistent compilation cache
    (a resumed or repeated run skips XLA compiles) unless JAX_COMPILATION_CACHE_DIR is set."""
    if cfg.compile_cache and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cfg.compile_cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def init_distributed(cfg: TrainConfig) -> None:
    """Before any other JAX call: `--dist.*` flags, else JAXMOE_* variables, else a detected
    TPU pod / SLURM / MPI cluster (jaxmoe/parallel/distributed.py); else one process."""
    d = cfg.dist
    try:
        distributed.init_distributed(d.coordinator, d.num_processes, d.process_id,
                                     d.cpu_collectives)
    except distributed.DistributedError as e:
        msg = str(e)
        raise TrainConfigError(msg if msg.startswith("--") else f"--dist.coordinator: {msg}") \
            from None


# ------------------------------------------------------------------------------ planning
@dataclasses.dataclass
class Plan:
    cfg: TrainConfig
    mcfg: ModelConfig
    mesh: Mesh
    train: data_lib.Corpus
    eval: data_lib.Corpus
    layout: Layout | None = None   # mesh + logical rules + EP spec (pjit_configs preset)
    resume_step: int | None = None  # the workdir's checkpoint to resume (check_workdir)


def build_layout(cfg: TrainConfig) -> Layout:
    """`--mesh.name auto|data`: one 'data' axis over every device (batch sharded, parameters
    replicated); any other name: that pjit_configs preset (parameters and optimizer state
    sharded by its rules, experts parallel per its `ep` or `--mesh.ep`)."""
    import pjit_configs

    m = cfg.mesh
    if m.name not in ("auto", "data"):
        preset = pjit_configs.get(m.name)
        if m.ep:
            preset = preset.replace(ep=m.ep)
        if m.capacity_factor:
            preset = preset.replace(capacity_factor=m.capacity_factor)
        try:
            return preset.layout()
        except pjit_configs.PresetError as e:
            raise TrainConfigError(f"--mesh.name={m.name!r}: {e}") from None
    n = data_devices(cfg)
    return pjit_configs.MeshPreset(m.name, pjit_configs.presets.SLICE, data=n).layout()


def data_devices(cfg: TrainConfig) -> int:
    """The 'auto'/'data' mesh's check: one 'data' axis over every device; their count."""
    devices = jax.devices()
    n = len(devices)
    want = n if cfg.mesh.data == -1 else cfg.mesh.data
    if want != n:
        raise TrainConfigError(f"--mesh.data={want}: mesh {cfg.mesh.name!r} must span all {n} "
                               f"devices ({devices[0].platform} x {n}, "
                               f"{jax.process_count()} process(es)); use -1 or {n}")
    return n


def resolve_model_config(cfg: TrainConfig) -> ModelConfig:
    from jaxmoe.safetensors_io import CheckpointError

    m = cfg.model
    overrides = model_overrides(cfg)
    over = {"param_dtype": m.param_dtype, "dtype": m.dtype, "moe_impl": m.moe_impl, **overrides}
    if m.init_from:
        if not os.path.exists(m.init_from):
            raise TrainConfigError(f"--model.init_from={m.init_from!r}: no such folder")
        from jaxmoe import orbax_io

        try:
            if orbax_io.is_orbax_dir(m.init_from):
                base = orbax_io.config_of(orbax_io.read_marker(m.init_from), m.param_dtype)
            else:
                base = ModelConfig.from_hf_config(m.init_from)
        except (ConfigError, CheckpointError, OSError) as e:
            raise TrainConfigError(f"--model.init_from={m.init_from!r}: {e}") from None
    try:
        if m.init_from:
            return check_same_shapes(base, base.replace(**over), m.init_from)
        return jaxmoe.get_preset(m.preset, **over)
    except TrainConfigError:
        raise
    except ConfigError as e:
        raise TrainConfigError(f"{_model_flag(str(e), overrides)}: {e}") from None


def _model_flag(msg: str, overrides: dict) -> str:
    """The flag behind a ModelConfig error: its own --model.<field> flag (param_dtype, dtype,
    moe_impl) unless --model.overrides sets that field, else the preset or the overrides."""
    if msg.startswith("unknown model preset"):
        return "--model.preset"
    for f in ("param_dtype", "dtype", "moe_impl"):
        if msg.startswith(f"ModelConfig.{f}=") and f not in overrides:
            return f"--model.{f}"
    return "--model.overrides"


def check_same_shapes(base: ModelConfig, cfg: ModelConfig, source: str) -> ModelConfig:
    """`--model.overrides` on top of `--model.init_from` may change how the model runs (dtypes,
    dispatch, routing mode), never the parameter shapes the checkpoint holds."""
    if param_shapes(base) != param_shapes(cfg):
        changed = sorted(changed_fields(base, cfg))
        raise TrainConfigError(
            f"--model.overrides changes the parameter shapes of --model.init_from={source!r} "
            f"(fields {changed}); only fields that keep the shapes may be overridden there")
    return cfg


def prepare(cfg: TrainConfig) -> Plan:
    cfg.validate()
    problem = folder_problem(cfg.workdir)
    if problem:
        raise TrainConfigError(f"--workdir={cfg.workdir!r}: {problem}")
    mcfg = resolve_model_config(cfg)
    d = cfg.data
    data_lib.check_paths(d)
    layout = build_layout(cfg)
    mesh = layout.mesh
    n_data = layout.batch_shards
    per_micro = d.batch_size // d.grad_accum
    if per_micro % n_data:
        raise TrainConfigError(
            f"--data.batch_size={d.batch_size}: {d.grad_accum} microbatch(es) of {per_micro} rows "
            f"do not divide over {n_data} data shards (need a multiple of "
            f"{n_data * d.grad_accum})")
    if d.seq_len > mcfg.max_position_embeddings:
        raise TrainConfigError(f"--data.seq_len={d.seq_len}: longer than the model's "
                               f"max_position_embeddings={mcfg.max_position_embeddings}")
    train, ev = data_lib.load_corpora(d, mcfg.vocab_size)
    return Plan(cfg, mcfg, mesh, train, ev, layout)


def describe_mesh(mesh: Mesh) -> str:
    return "{" + ", ".join(f"{a}: {n}" for a, n in mesh.shape.items() if n > 1) + "}"


# --------------------------------------------------------------------------- preemption
class StopFlag:
    """SIGTERM/SIGINT -> finish the current step, save, exit 0. A second signal exits now.
    Multi-process runs also agree on the step through Orbax's preemption sync point."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def install(self):
        if jax.process_count() > 1:
            return self  # JAX's preemption notifier owns SIGTERM; see Checkpointer
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise SystemExit(128 + signum)
        self.signum = signum

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------------------- run
def run(cfg: TrainConfig) -> dict:
    """Train per `cfg`; returns the last metrics record (process 0's view)."""
    setup_jax(cfg)
    init_distributed(cfg)
    plan = prepare(cfg)
    plan.resume_step = check_workdir(cfg, plan.mcfg, resolve_model_config)
    if plan.resume_step is not None and plan.resume_step >= cfg.steps:
        # config.json stays the finished run's: nothing of this invocation is recorded
        log(f"--workdir={cfg.workdir!r} is already at step {plan.resume_step} >= --steps "
            f"{cfg.steps}: nothing to do (raise --steps to train further)")
        return {"step": plan.resume_step}
    with plan.layout.scope():  # traced steps: activation rules + expert-parallel MoE
        return _run(cfg, plan)


def _run(cfg: TrainConfig, plan: Plan) -> dict:
    mesh, d = plan.mesh, cfg.data
    replicated = plan.layout.replicated
    batch_sharding = plan.layout.batch_sharding(batch_dim=1)  # [A, B, T+1]: rows split
    tx, lr_fn = make_optimizer(cfg.optim, cfg.steps, cfg.stage)
    t0 = time.perf_counter()
    from jaxmoe.safetensors_io import CheckpointError

    try:
        graphdef, state = init_state(plan, tx)
    except CheckpointError as e:  # a truncated/corrupt shard of the folder fine-tuned from
        if not cfg.model.init_from:
            raise
        raise TrainConfigError(f"--model.init_from={cfg.model.init_from!r}: {e}") from None
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    mcfg = plan.mcfg
    fns = StepFns(graphdef, mcfg, cfg.loss, tx, lr_fn, cfg.steps, lora=bool(cfg.lora.rank),
                  lora_dropout=cfg.lora.dropout, stage=cfg.stage, doc_masking=cfg.data.doc_masking)
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    if cfg.lora.rank:
        n_base = sum(x.size for x in jax.tree.leaves(state["frozen"]))
        log(f"LoRA rank {cfg.lora.rank}, alpha {cfg.lora.alpha}, dropout {cfg.lora.dropout} on "
            f"{cfg.lora.targets}: {n_params:,} adapter parameters train, {n_base:,} base "
            f"parameters frozen; checkpoints hold the adapters only")
    if cfg.stage.enabled:
        from jaxmoe.train.staged import describe

        log(describe(cfg.stage, cfg.steps))
    with_mtp = fns.use_mtp
    flops_tok = metrics_lib.train_flops_per_token(mcfg, d.seq_len, with_mtp)
    peak, peak_src = metrics_lib.peak_tflops(jax.devices(), mcfg.dtype, cfg.log.peak_tflops)
    log(f"jaxmoe-train {cfg.name}: {n_params / 1e6:.2f}M params "
        f"({metrics_lib.active_matmul_params(mcfg, with_mtp) / 1e6:.2f}M active matmul), "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s) in {jax.process_count()} "
        f"process(es), mesh {plan.layout.name} {describe_mesh(mesh)}; data {plan.train.name}: "
        f"{len(plan.train.tokens):,} train / {len(plan.eval.tokens):,} eval tokens; "
        f"batch {d.batch_size} x {d.seq_len} (x{d.grad_accum} accum); peak {peak_src}")
    log(f"losses: mtp lambda {cfg.loss.mtp_weight if fns.use_mtp else 'off'}, balance alpha "
        f"{cfg.loss.balance_alpha if fns.use_balance else 'off'}, bias update gamma "
        f"{cfg.loss.bias_update_speed if fns.use_bias else 'off'}")

    ckpt = Checkpointer(os.path.join(cfg.workdir, "checkpoints"), cfg.ckpt.every, cfg.ckpt.keep,
                        cfg.ckpt.async_save)
    consumed, start = 0, 0
    latest = plan.resume_step
    if latest is not None:
        try:
            restored, meta = ckpt.restore(latest, abstract_of(saved_part(state)))
        except ValueError as e:  # structure/shape mismatch check_workdir could not see
            raise TrainConfigError(
                f"--workdir={cfg.workdir!r}: its checkpoint step {latest} does not fit this "
                f"run's train state ({e}); resume with the flags it was started with, or use a "
                "fresh --workdir") from None
        state = dict(state, **restored)
        consumed, start = int(meta["data"]["consumed"]), int(latest)
        if meta["data"].get("fingerprint") != plan.train.fingerprint:
            log(f"warning: the training data differ from the checkpoint's "
                f"({meta['data'].get('fingerprint')} -> {plan.train.fingerprint})")
        log(f"resumed from {ckpt.directory} step {start} (data position {consumed:,} rows)")
    elif cfg.ckpt.resume and cfg.model.init_from:
        log(f"initialised from {cfg.model.init_from}")

    writer = metrics_lib.MetricsWriter(cfg.workdir, start, cfg.log.tensorboard,
                                       enabled=jax.process_index() == 0)
    if jax.process_index() == 0:
        with open(os.path.join(cfg.workdir, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=1)
        if writer.dropped:
            log(f"metrics.jsonl: dropped {writer.dropped} line(s) after step {start} "
                "(not in the checkpoint)")

    loader = functools.partial(batches.Loader, seq_len=d.seq_len, batch_size=d.batch_size,
                               grad_accum=d.grad_accum, seed=cfg.seed, doc_masking=d.doc_masking)
    train_loader = loader(plan.train)
    eval_loader = (loader(plan.eval, shuffle=False)
                   if plan.eval.n_rows(d.seq_len) > 0 and d.eval_batches > 0 else None)
    jstep = jax.jit(fns.train_step, donate_argnums=(0,),
                    out_shardings=(state_sh, replicated))
    jeval = jax.jit(fns.eval_step, out_shardings=replicated)

    def evaluate(st):
        tot, cnt = 0.0, 0.0
        for j in range(d.eval_batches):
            s, c = jeval(st, eval_loader.global_batch(j * d.batch_size, batch_sharding))
            tot, cnt = tot + float(s), cnt + float(c)
        return tot / max(cnt, 1.0)

    def meta_of(consumed_):
        return checkpoint_meta(cfg, plan.train, consumed_)

    stop = StopFlag().install()
    tokens_per_step = d.batch_size * d.seq_len
    clock = {"prev": None}  # when the previous step's results were in hand
    last: dict = {}

    def ready(pending) -> dict:
        """Step s's record once its metrics are in hand. Step time = ready(s) - max(ready(s-1),
        dispatch(s)), so eval/checkpoint work between steps is not charged to a step; the
        first step of a process (compile) gets no throughput."""
        s, m, t_disp = pending
        rec = {"step": s, **{k: np.asarray(v) for k, v in jax.device_get(m).items()}}
        now = time.perf_counter()
        if clock["prev"] is not None:
            dt = now - max(clock["prev"], t_disp)
            rec["step_time_s"] = dt
            rec["tokens_per_s"] = tokens_per_step / dt
            if peak:
                rec["mfu"] = flops_tok * tokens_per_step / dt / (peak * 1e12)
        clock["prev"] = now
        rec["tokens"] = s * tokens_per_step
        return rec

    def emit(rec: dict) -> None:
        nonlocal last
        if np.size(rec.get("expert_counts", ())) > DETAIL_MAX and not (
                cfg.log.counts_every and rec["step"] % cfg.log.counts_every == 0):
            rec.pop("expert_counts")  # large models: every --log.counts_every steps (report.py)
        writer.write(rec)
        rec = {k: (v.item() if isinstance(v, np.ndarray) and v.ndim == 0 else v)
               for k, v in rec.items()}
        s = rec["step"]
        if s % cfg.log.every == 0 or s == cfg.steps or "eval_loss" in rec:
            log(metrics_lib.progress_line(rec, cfg.steps))
        last = rec

    step, pending = start, None
    log(f"setup {time.perf_counter() - t0:.1f}s; steps {start + 1}..{cfg.steps}")
    try:
        while step < cfg.steps:
            batch = train_loader.global_batch(consumed, batch_sharding)  # overlaps step s-1
            t_disp = time.perf_counter()
            state, m = jstep(state, batch)
            step += 1
            consumed += d.batch_size
            if pending is not None:
                emit(ready(pending))
            pending = (step, m, t_disp)
            if eval_loader is not None and (
                    (cfg.log.eval_every and step % cfg.log.eval_every == 0) or step == cfg.steps):
                rec = ready(pending)
                rec["eval_loss"] = evaluate(state)
                emit(rec)
                pending = None
            preempted = stop.signum is not None or (
                jax.process_count() > 1 and ckpt.reached_preemption(step))
            chunk_done = cfg.run_steps and step - start >= cfg.run_steps
            if (step == cfg.steps or preempted or chunk_done) and pending is not None:
                emit(ready(pending))
                pending = None
            if step == cfg.steps or preempted or chunk_done:
                ckpt.save(step, saved_part(state), meta_of(consumed), force=True)
                if preempted or chunk_done:
                    ckpt.wait()
                    why = f"preempted (signal {stop.signum})" if preempted else \
                        f"--run_steps {cfg.run_steps} done"
                    log(f"{why}: saved step {step} to {ckpt.directory}; exiting")
                    break
            else:
                ckpt.save(step, saved_part(state), meta_of(consumed))
        if pending is not None:
            emit(ready(pending))
        ckpt.close()
    finally:
        stop.restore()
        writer.close()
    if step == cfg.steps and stop.signum is None and cfg.log.sample_bytes and plan.train.byte_level:
        from jaxmoe.train.sample import generate_text

        model = fns.model_of(state["params"], state["biases"], fns.fixed_parts(state))
        text = generate_text(model, b"def ", cfg.log.sample_bytes, state["rng"])
        log("sample (temperature 0.8, prompt 'def '):\n" + text)
    return last
