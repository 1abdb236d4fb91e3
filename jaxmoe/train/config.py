"""`TrainConfig`: one typed, frozen description of a training run. The named runs are in
`jaxmoe.train.runs`; the command line that selects one and overrides any field is
`jaxmoe.train.flags`.

    jaxmoe-train --config tiny --steps 50 --workdir /tmp/run --optim.lr 1e-3 --data.batch_size 32

Every field is a flag named `--section.field` (`--steps`, `--workdir`, `--seed` are top-level);
`--help` (after `--config NAME`) lists them with that run's values as defaults. Values are parsed
by the field's type; booleans take true/false. `--model.overrides "hidden_size=128,..."` edits
the architecture (`ModelConfig` fields, typed the same way). `validate()` raises `TrainConfigError`
naming the field for every combination that cannot run; `trainer.prepare()` adds the checks that
need the devices and the data (mesh/device mismatch, batch divisibility, missing paths), all
before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from jaxmoe.config import DTYPES, MOE_IMPLS, ConfigError, ModelConfig

SCHEDULES = ("cosine", "staged", "constant")
SOURCES = ("stdlib", "memmap", "jsonl")
MESHES = ("auto", "data")
BIN_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64")


class TrainConfigError(ConfigError):
    """A run that cannot start; the message names the flag."""


@dataclasses.dataclass(frozen=True)
class ModelSection:
    preset: str = "tiny"                # jaxmoe.PRESETS name (ignored with init_from)
    overrides: str = ""                 # "field=value,..." applied to the ModelConfig
    init_from: str = ""                 # HF or converted Orbax folder to fine-tune from
    param_dtype: str = "float32"        # master weights
    dtype: str = "float32"              # matmul compute dtype
    moe_impl: str = "auto"              # routed-expert dispatch (kernels/dispatch.py)
    remat: bool = False                 # recompute each layer in the backward pass
    init: str = "auto"                  # random init: host (numpy) | device (jitted) | auto


@dataclasses.dataclass(frozen=True)
class MeshSection:
    name: str = "auto"                  # 'auto' | 'data' | a pjit_configs preset (cpu-8, v5p-1024,
                                        # h100-<N>x8, ...: parameters + optimizer state sharded)
    data: int = -1                      # 'auto'/'data' mesh: data-parallel shards; -1 = all
    ep: str = ""                        # preset's expert-parallel variant override: a2a_fixed |
                                        # ragged_a2a | allgather | none ('' = the preset's)
    capacity_factor: float = 0.0        # a2a_fixed buffer = factor x mean load (0: preset's)


@dataclasses.dataclass(frozen=True)
class DataSection:
    source: str = "stdlib"              # stdlib | memmap | jsonl
    path: str = ""                      # memmap .npy/.bin or .jsonl file
    eval_path: str = ""                 # optional held-out file of the same kind
    tokenizer: str = ""                 # tokenizer.json (jsonl)
    text_key: str = "text"              # jsonl field holding the document
    bin_dtype: str = "uint16"           # element type of a raw .bin memmap
    eos_id: int = -1                    # memmap: token ending a document (-1: one document)
    seq_len: int = 128                  # tokens the model sees per row
    batch_size: int = 16                # GLOBAL rows per optimizer step
    grad_accum: int = 1                 # microbatches per optimizer step
    eval_fraction: float = 0.02         # held-out share when there is no eval_path
    eval_batches: int = 4               # eval batches (of batch_size rows) per evaluation
    max_bytes: int = 0                  # stdlib corpus cap in bytes (0: all of it)
    doc_masking: bool = True            # attention, positions and targets stay within each document;
                                        # false: plain causal over the packed row (the report's
                                        # pretraining, dsv3-spec §2)


MOMENT_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class OptimSection:
    lr: float = 3e-3                    # peak learning rate
    schedule: str = "cosine"            # cosine | staged (DeepSeek-V3 report) | constant
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1           # cosine floor as a fraction of lr
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1           # not applied to norm scales or biases
    clip_norm: float = 1.0              # global-norm clipping (0: off)
    moments_dtype: str = "float32"      # AdamW moments' storage: float32 | bfloat16 (the report
                                        # keeps both in BF16: half the optimizer memory; the
                                        # update itself is computed in float32)


@dataclasses.dataclass(frozen=True)
class LossSection:
    mtp_weight: float = 0.3             # lambda; 0 turns MTP off
    mtp_weight_late: float = 0.1        # lambda after mtp_switch
    mtp_switch: float = 10.0 / 14.8     # fraction of steps (report: first 10T of 14.8T tokens)
    mtp_shared_embeddings: bool = True  # MTP reads the main embedding and output head (spec §5.2);
                                        # its stored copies are kept equal; false: trained apart
    balance_alpha: float = 1e-4         # sequence-wise balance loss; 0 turns it off
    bias_update_speed: float = 1e-3     # gamma of the aux-loss-free bias update; 0 turns it off
    bias_update_stop: float = 14.3 / 14.8  # fraction of steps after which gamma = 0


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    every: int = 100                    # save every K steps (0: only at the end / on SIGTERM)
    keep: int = 3                       # keep the newest N
    async_save: bool = True
    resume: bool = True                 # resume from WORKDIR/checkpoints when present


@dataclasses.dataclass(frozen=True)
class LogSection:
    every: int = 1                      # progress line every N steps (metrics.jsonl: every step)
    eval_every: int = 50                # eval loss every M steps (0: only at the end)
    tensorboard: bool = True            # event files in WORKDIR/tb
    peak_tflops: float = 0.0            # per-device peak for MFU (0: table / measured on CPU)
    sample_bytes: int = 200             # generated sample at the end (byte-level corpora; 0: off)
    counts_every: int = 0               # models > 512 (layer, expert) pairs: expert_counts every N


@dataclasses.dataclass(frozen=True)
class LoraSection:
    rank: int = 0                       # adapter rank; 0 = full fine-tuning (guide: 16)
    alpha: float = 32.0                 # adapters scaled by alpha / rank (guide: 32)
    dropout: float = 0.1                # on the adapters' input features (jaxmoe/lora/attach.py)
    targets: str = "q,q_a,q_b,kv_a,kv_b,o"  # MLA projections; also shared, experts, mlp


@dataclasses.dataclass(frozen=True)
class StageSection:
    enabled: bool = False               # staged MoE training (jaxmoe/train/staged.py)
    warmup: float = 0.1                 # fraction of steps with the router frozen
    joint: float = 0.7                  # then all parameters, clipped; the rest: sparsify
    sparsity_weight: float = 0.01       # sparsify phase: + weight x router score entropy


@dataclasses.dataclass(frozen=True)
class DistSection:
    coordinator: str = ""               # host:port | auto (TPU pods, SLURM, MPI); empty = single
                                        # process, or what JAXMOE_COORDINATOR / a launcher sets
    num_processes: int = 1
    process_id: int = 0
    cpu_collectives: str = "gloo"       # CPU cross-process collectives


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    name: str = "tiny"                  # run name (set by --config)
    steps: int = 300                    # optimizer steps of the whole run (sets the schedules)
    workdir: str = "runs/tiny"          # checkpoints, metrics.jsonl, tb/; reused = resumed
    run_steps: int = 0                  # stop (and save) after this many steps in this invocation
    seed: int = 0                       # init and data order
    compile_cache: str = "~/.cache/jaxmoe/xla"  # persistent XLA compilation cache ('' : off)
    model: ModelSection = ModelSection()
    mesh: MeshSection = MeshSection()
    data: DataSection = DataSection()
    optim: OptimSection = OptimSection()
    loss: LossSection = LossSection()
    ckpt: CheckpointSection = CheckpointSection()
    log: LogSection = LogSection()
    dist: DistSection = DistSection()
    lora: LoraSection = LoraSection()
    stage: StageSection = StageSection()

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "TrainConfig":
        def need(cond: bool, flag: str, msg: str):
            if not cond:
                raise TrainConfigError(f"--{flag}={_get(self, flag)!r}: {msg}")

        for flag, value in _float_values(self):  # inf/nan would train NaN (and save it)
            need(math.isfinite(value), flag, "must be a finite number")
        need(self.steps > 0, "steps", "must be positive")
        need(self.run_steps >= 0, "run_steps", "must be >= 0 (0: run to --steps)")
        need(self.seed >= 0, "seed", "must be >= 0")
        need(bool(self.workdir), "workdir", "must name a folder")
        d, o, lo, c, lg = self.data, self.optim, self.loss, self.ckpt, self.log
        need(self.model.init in ("auto", "host", "device"), "model.init",
             "must be auto, host or device")
        need(self.model.param_dtype in DTYPES, "model.param_dtype", f"must be one of {DTYPES}")
        need(self.model.dtype in DTYPES, "model.dtype", f"must be one of {DTYPES}")
        need(self.model.moe_impl in MOE_IMPLS, "model.moe_impl", f"must be one of {MOE_IMPLS}")
        need(d.source in SOURCES, "data.source", f"must be one of {SOURCES}")
        need(d.source == "stdlib" or bool(d.path), "data.path",
             f"data.source={d.source!r} needs a file")
        need(d.source != "jsonl" or bool(d.tokenizer), "data.tokenizer",
             "jsonl text needs a tokenizer.json")
        need(d.seq_len >= 2, "data.seq_len", "must be >= 2")
        need(d.batch_size > 0, "data.batch_size", "must be positive")
        need(d.grad_accum > 0, "data.grad_accum", "must be positive")
        need(d.batch_size % d.grad_accum == 0, "data.batch_size",
             f"must be divisible by data.grad_accum={d.grad_accum}")
        need(0.0 <= d.eval_fraction < 1.0, "data.eval_fraction", "must be in [0, 1)")
        need(d.eval_batches >= 0, "data.eval_batches", "must be >= 0")
        need(d.bin_dtype in BIN_DTYPES, "data.bin_dtype", f"must be one of {BIN_DTYPES}")
        need(d.eos_id >= -1, "data.eos_id", "must be a token id or -1 (one document)")
        need(d.max_bytes >= 0, "data.max_bytes", "must be >= 0 (0: all of it)")
        import pjit_configs

        need(self.mesh.name in MESHES or _is_preset(self.mesh.name), "mesh.name",
             f"unknown mesh preset; known: {list(MESHES) + pjit_configs.names()}")
        need(self.mesh.data == -1 or self.mesh.data > 0, "mesh.data", "must be -1 or positive")
        need(self.mesh.data == -1 or self.mesh.name in MESHES, "mesh.data",
             f"sizes the 'auto'/'data' mesh only; preset {self.mesh.name!r} fixes its shape")
        need(self.mesh.ep in ("",) + pjit_configs.mesh.EP_CHOICES, "mesh.ep",
             f"must be one of {pjit_configs.mesh.EP_CHOICES} (or empty: the preset's)")
        need(self.mesh.capacity_factor >= 0, "mesh.capacity_factor", "must be >= 0 (0: preset's)")
        need(o.schedule in SCHEDULES, "optim.schedule", f"must be one of {SCHEDULES}")
        need(o.lr > 0, "optim.lr", "must be positive")
        need(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        need(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "must be in [0, 1]")
        for f in ("b1", "b2"):  # Adam's moment decay rates; 1 would never forget (b2: divide by 0)
            need(0.0 <= getattr(o, f) < 1.0, f"optim.{f}", "must be in [0, 1)")
        need(o.eps > 0, "optim.eps", "must be positive (it keeps Adam's denominator off 0)")
        need(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        need(o.clip_norm >= 0, "optim.clip_norm", "must be >= 0 (0: off)")
        need(o.moments_dtype in MOMENT_DTYPES, "optim.moments_dtype",
             f"must be one of {MOMENT_DTYPES}")
        for f in ("mtp_weight", "mtp_weight_late", "balance_alpha", "bias_update_speed"):
            need(getattr(lo, f) >= 0, f"loss.{f}", "must be >= 0 (0: off)")
        for f in ("mtp_switch", "bias_update_stop"):  # fractions of --steps
            need(0.0 <= getattr(lo, f) <= 1.0, f"loss.{f}", "a fraction of --steps: in [0, 1]")
        need(c.every >= 0, "ckpt.every", "must be >= 0 (0: only at the end)")
        need(c.keep >= 1, "ckpt.keep", "must be >= 1")
        need(lg.every >= 1, "log.every", "must be >= 1")
        need(lg.eval_every >= 0, "log.eval_every", "must be >= 0")
        need(lg.peak_tflops >= 0, "log.peak_tflops", "must be >= 0 (0: table / measured)")
        need(lg.sample_bytes >= 0, "log.sample_bytes", "must be >= 0 (0: off)")
        need(lg.counts_every >= 0, "log.counts_every", "must be >= 0 (0: never)")
        from jaxmoe.parallel.distributed import CPU_COLLECTIVES

        need(self.dist.cpu_collectives in CPU_COLLECTIVES, "dist.cpu_collectives",
             f"must be one of {CPU_COLLECTIVES}")
        need(self.dist.num_processes >= 1, "dist.num_processes", "must be >= 1")
        need(0 <= self.dist.process_id < self.dist.num_processes, "dist.process_id",
             f"must be in [0, {self.dist.num_processes})")
        la, st = self.lora, self.stage
        need(la.rank >= 0, "lora.rank", "must be >= 0 (0: full fine-tuning)")
        if la.rank:
            from jaxmoe.lora import TARGETS
            need(la.alpha > 0, "lora.alpha", "must be positive")
            need(0.0 <= la.dropout < 1.0, "lora.dropout", "must be in [0, 1)")
            targets = [t.strip() for t in la.targets.split(",") if t.strip()]
            need(bool(targets) and all(t in TARGETS for t in targets), "lora.targets",
                 f"comma-separated names from {list(TARGETS)}")
        if st.enabled:
            need(0.0 <= st.warmup < 1.0, "stage.warmup", "must be in [0, 1)")
            need(0.0 <= st.joint and st.warmup + st.joint <= 1.0, "stage.joint",
                 f"must be >= 0 with stage.warmup + stage.joint <= 1 (warmup {st.warmup})")
            need(st.sparsity_weight >= 0, "stage.sparsity_weight", "must be >= 0")
            need(o.clip_norm > 0, "optim.clip_norm", "staged training clips its joint phase: > 0")
        model_overrides(self)  # parses and type-checks the architecture overrides
        return self

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Inverse of to_dict (e.g. a run's WORKDIR/config.json); unknown keys are an error."""
        kw = {}
        for name, typ in _fields(cls).items():
            if name not in d:
                continue
            kw[name] = typ(**d[name]) if dataclasses.is_dataclass(typ) else d[name]
        extra = set(d) - set(kw)
        if extra:
            raise TrainConfigError(f"run config: unknown field(s) {sorted(extra)}")
        return cls(**kw)


def _float_values(cfg: "TrainConfig"):
    """(flag, value) of every float field, nested sections included."""
    for name, typ in _fields(type(cfg)).items():
        value = getattr(cfg, name)
        if dataclasses.is_dataclass(typ):
            yield from ((f"{name}.{flag}", v) for flag, v in _float_values(value))
        elif typ is float:
            yield name, value


def _is_preset(name: str) -> bool:
    import pjit_configs

    try:
        pjit_configs.get(name)
        return True
    except pjit_configs.PresetError:
        return False


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _fields(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _parse_value(text: str, typ, flag: str):
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if text.lower() in ("none", "null", ""):
            return None
        typ = args[0]
    try:
        if typ is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if typ is int:
            try:
                return int(text)
            except ValueError:  # 1e3 is fine, 25e-1 is not silently 2
                x = float(text)
                if not x.is_integer():
                    raise ValueError(f"{text} is not a whole number") from None
                return int(x)
        if typ is float:
            return float(text)
        return typ(text)
    except ValueError as e:
        raise TrainConfigError(f"--{flag}={text!r}: not a valid {typ.__name__} ({e})") from None


def model_overrides(cfg: TrainConfig) -> dict[str, Any]:
    """`--model.overrides "a=1,b=x"` parsed by ModelConfig's field types."""
    text = cfg.model.overrides.strip()
    if not text:
        return {}
    types_ = _fields(ModelConfig)
    out = {}
    for item in text.split(","):
        if "=" not in item:
            raise TrainConfigError(f"--model.overrides: {item!r} is not field=value")
        k, v = (s.strip() for s in item.split("=", 1))
        if k not in types_:
            raise TrainConfigError(f"--model.overrides: ModelConfig has no field {k!r}")
        out[k] = _parse_value(v, types_[k], f"model.overrides {k}")
    return out
