"""Putting adapters on a DeepseekV3, training-time dropout, and folding them back in.

    spec = LoraSpec(rank=16, alpha=32, dropout=0.1, targets=("q_a", "q_b", "kv_a", "kv_b", "o"))
    n = attach(model, spec, jax.random.key(0))   # in place: adapted weights become LoRAWeight
    ...train the nnx.LoRAParam leaves only...
    merge(model)                                 # in place: plain nnx.Param again, W + (a/r) A B

Targets (the guide's names): `q` (no query compression) or `q_a`/`q_b`, `kv_a`
(kv_a_proj_with_mqa), `kv_b`, `o` in every MLA; `shared` (the shared experts' gate/up/down),
`experts` (the routed experts: one pair per expert, stacked [E, ...]) and `mlp` (the dense
layers' FFN). A target the architecture lacks (`q` with a q_lora_rank) is skipped. Every decoder
layer is adapted: the two scanned stacks (adapters carry their [L] axis) and the MTP layers
(unless `mtp=False`: the trainer adapts them only when the run trains MTP).

Dropout: weight-space adapters never see the activations, so input dropout x -> dropout(x)
cannot be applied per token. `dropout_adapters` drops rows of A instead, i.e. input features
of the adapter path, with one mask per adapter (per layer, per expert) shared by every token of
the optimizer step and resampled each step; kept rows are scaled by 1/(1-p). Same expectation
as the guide's per-token dropout; it differs in that all tokens of a step share the mask.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe.layers.mla import MLA
from jaxmoe.layers.mlp import MLP
from jaxmoe.layers.moe import MoE
from jaxmoe.lora.adapter import LoRAWeight

ATTENTION = {"q": "wq_DNJ", "q_a": "wq_a_DQ", "q_b": "wq_b_QNJ", "kv_a": "wkv_a_DP",
             "kv_b": "wkv_b_CNI", "o": "wo_NGD"}
MLP_NAMES = ("w_gate_DF", "w_up_DF", "w_down_FD")
EXPERT_NAMES = ("w_gate_EDF", "w_up_EDF", "w_down_EFD")
TARGETS = tuple(ATTENTION) + ("shared", "experts", "mlp")
DEFAULT_TARGETS = ("q", "q_a", "q_b", "kv_a", "kv_b", "o")  # the guide's attention projections


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.1
    targets: tuple[str, ...] = DEFAULT_TARGETS
    mtp: bool = True  # adapt the MTP modules' layers too (the trainer: when MTP trains)

    def __post_init__(self):
        bad = [t for t in self.targets if t not in TARGETS]
        if bad:
            raise ValueError(f"unknown LoRA target(s) {bad}; known: {list(TARGETS)}")
        if self.rank < 1:
            raise ValueError(f"LoRA rank={self.rank}: must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout={self.dropout}: must be in [0, 1)")

    @classmethod
    def parse_targets(cls, text: str) -> tuple[str, ...]:
        return tuple(t.strip() for t in text.split(",") if t.strip())


def decoder_layers(model, mtp: bool = True) -> Iterator[tuple[str, nnx.Module]]:
    """(path, DecoderLayer) of the dense stack, the MoE stack and every MTP module."""
    if model.dense_layers is not None:
        yield "dense_layers", model.dense_layers
    if model.moe_layers is not None:
        yield "moe_layers", model.moe_layers
    for i, m in enumerate(model.mtp if mtp else ()):
        yield f"mtp.{i}.layer", m.layer


def sites(model, targets, mtp: bool = True) -> Iterator[tuple[str, nnx.Module, str]]:
    """(path, owner module, attribute) of every weight the targets name."""
    targets = set(targets)
    for path, layer in decoder_layers(model, mtp):
        attn = layer.attn
        assert isinstance(attn, MLA)
        for t, name in ATTENTION.items():
            if t in targets and hasattr(attn, name):
                yield f"{path}.attn.{name}", attn, name
        ffn = layer.ffn
        if isinstance(ffn, MoE):
            if "experts" in targets:
                for name in EXPERT_NAMES:
                    yield f"{path}.ffn.{name}", ffn, name
            if "shared" in targets and ffn.shared is not None:
                for name in MLP_NAMES:
                    yield f"{path}.ffn.shared.{name}", ffn.shared, name
        elif isinstance(ffn, MLP) and "mlp" in targets:
            for name in MLP_NAMES:
                yield f"{path}.ffn.{name}", ffn, name


def attach(model, spec: LoraSpec, key: jax.Array) -> int:
    """Wrap every targeted weight of `model` in a LoRAWeight (in place; works on an abstract
    model under nnx.eval_shape too). Returns the number of adapted weights."""
    n = 0
    for path, owner, name in sites(model, spec.targets, spec.mtp):
        var = getattr(owner, name)
        if isinstance(var, LoRAWeight):
            raise ValueError(f"{path} already has an adapter")
        k = jax.random.fold_in(key, zlib.crc32(path.encode()))
        setattr(owner, name, LoRAWeight(var, name, spec.rank, spec.alpha, k))
        n += 1
    if n == 0:
        raise ValueError(f"LoRA targets {spec.targets} match no weight of this model")
    return n


def adapted(model) -> Iterator[tuple[str, nnx.Module, str, LoRAWeight]]:
    for path, owner, name in sites(model, TARGETS):
        var = getattr(owner, name)
        if isinstance(var, LoRAWeight):
            yield path, owner, name, var


def has_adapters(model) -> bool:
    return any(True for _ in adapted(model))


def merge(model) -> int:
    """Fold every adapter into its base (in place): W <- W + (alpha/r) A B, stored in the model's
    param_dtype as a plain nnx.Param with the base's axis names. Returns how many were merged."""
    n = 0
    for _, owner, name, lw in adapted(model):
        meta = lw.base.get_metadata()
        setattr(owner, name, nnx.Param(lw.merged(model.cfg), out_sharding=meta.get("out_sharding"),
                                       eager_sharding=False))
        n += 1
    return n


def dropout_adapters(params: nnx.State, rng: jax.Array, rate: float) -> nnx.State:
    """Dropout on the adapters' inputs: rows of every `lora_a` [.., in, r] zeroed with
    probability `rate`, the kept ones scaled by 1/(1-rate); one mask per adapter (and per layer
    and expert) for the whole step. Differentiable in A (dropped rows get zero gradient)."""
    if rate <= 0:
        return params
    flat = list(nnx.to_flat_state(params))
    out = []
    for i, (path, var) in enumerate(flat):
        if path and path[-1] == "lora_a":
            a = var.get_value()
            keep = jax.random.bernoulli(jax.random.fold_in(rng, i), 1.0 - rate,
                                        a.shape[:-1] + (1,))  # [.., in, 1]: whole input rows
            var = var.replace(jnp.where(keep, a / (1.0 - rate), 0.0))
        out.append((path, var))
    return nnx.from_flat_state(out)


def count(state: nnx.State) -> int:
    return sum(x.size for x in jax.tree.leaves(state))
