"""The functional train and eval steps (`nnx.merge` inside `jax.jit`) and the losses of
dsv3-spec §11, all in float32:

  objective = CE(next token)
            + lambda(step) / D * sum_k CE_k(MTP depth k)      (lambda 0.3 -> 0.1; 0: off)
            + alpha * sum_layers sum_i f_i P_i                 (sequence-wise balance; 0: off)

Token losses are sums over unmasked targets divided by the count over the WHOLE global batch,
so gradient accumulation over microbatches gives exactly the full-batch gradient.

After the optimizer update - outside the gradient - the aux-loss-free bias update moves each
router's `e_score_correction_bias` by a fixed step gamma against its expert's load,
b_i += gamma * sign(mean_j c_j - c_i), then re-centres b to mean 0. The counts c are summed
over every microbatch of the global batch, which is sharded over all data shards and
processes, so inside the jitted step XLA reduces them across devices and hosts: every replica
applies the same update from GLOBAL counts.

State: {"params", "biases", "rest", "opt", "rng", "step"}; batches come from
`batches.Loader.global_batch` as {"tokens", "segments", "positions"} [A, B/A, T + 1].

LoRA runs (jaxmoe/lora): "params" holds only the adapters (what the optimizer sees), the frozen
base sits in "frozen"; adapter dropout masks come from the step's RNG; the base's router biases
stay as loaded (no bias update). Staged runs (staged.py): the phase comes from the step, the
optimizer masks the router during warm-up, and the sparsify phase adds sparsity_weight x
router_entropy: the MEAN over the routers (MoE layers, MoE MTP depths when MTP is on) of each
one's mean per-token entropy of its normalised scores, so it lies in [0, ln E] at any depth.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxmoe.config import ModelConfig
from jaxmoe.layers.mla import causal_mask
from jaxmoe.train import staged as staged_lib
from jaxmoe.train.config import LossSection


# ------------------------------------------------------------------------------- masks
def doc_mask(segments: jax.Array, positions: jax.Array) -> jax.Array:
    """[B, T] segment ids -> [B, 1, T, T] bool: causal within the same document."""
    same = segments[:, None, :, None] == segments[:, None, None, :]
    idx = jnp.broadcast_to(jnp.arange(segments.shape[1]), segments.shape)
    return same & causal_mask(idx, idx) & (segments[:, None, :, None] > 0)


def target_mask(segments: jax.Array, k: int = 0) -> jax.Array:
    """[B, T+1] -> [B, T-k] float: target i+k+1 lies in token i's document (no padding)."""
    T1 = segments.shape[1]
    src, tgt = segments[:, :T1 - 1 - k], segments[:, k + 1:]
    return ((src == tgt) & (src > 0)).astype(jnp.float32)


def nll_sum(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    gold = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return ((logz - gold) * mask).sum()


def tie_mtp_embeddings(params):
    """dsv3-spec §5.2: every MTP depth shares the main model's embedding and output head. The
    model keeps each depth's own copies (the release stores them as layer 61 tensors), so training
    writes the main arrays into them: inside the loss (the MTP loss's gradient then reaches the main
    embedding and head; the copies get none) and after each update (saved copies stay equal).
    A no-op for trees without the main arrays (LoRA adapters) or without MTP depths."""
    if "mtp" not in params or "embed_VD" not in params or "lm_head_DV" not in params:
        return params
    main = {"embed_VD": jax.tree.leaves(params["embed_VD"])[0],
            "head_DV": jax.tree.leaves(params["lm_head_DV"])[0]}

    def pick(path, x):
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        return main[keys[2]] if keys[0] == "mtp" and len(keys) > 2 and keys[2] in main else x

    return jax.tree_util.tree_map_with_path(pick, params)


# ---------------------------------------------------------------------------- the step
class StepFns:
    """Builds the jitted train / eval steps for one model graph and one run config."""

    def __init__(self, graphdef, mcfg: ModelConfig, loss: LossSection, tx: optax.GradientTransformation,
                 lr_fn: Callable, total_steps: int, *, lora: bool = False, lora_dropout: float = 0.0,
                 stage=None, doc_masking: bool = True):
        self.graphdef, self.mcfg, self.loss, self.tx, self.lr_fn = graphdef, mcfg, loss, tx, lr_fn
        self.total_steps = total_steps
        # without document masking (one segment per row) the model's own causal mask is the mask
        self.doc_masking = doc_masking
        self.use_mtp = loss.mtp_weight > 0 and mcfg.num_nextn_predict_layers > 0
        self.tie_mtp = self.use_mtp and loss.mtp_shared_embeddings
        self.use_balance = loss.balance_alpha > 0 and mcfg.num_moe_layers > 0
        # LoRA freezes the whole base, the router's selection biases included
        self.use_bias = loss.bias_update_speed > 0 and mcfg.has_router_bias and not lora
        self.lora_dropout = lora_dropout if lora else 0.0
        self.stage = stage if stage is not None and stage.enabled else None

    def phase(self, step):
        """Staged-training phase of the update at `step` (0 when not staged)."""
        if self.stage is None:
            return jnp.zeros((), jnp.int32)
        return staged_lib.phase_of(step, self.stage, self.total_steps)

    def model_of(self, params, biases, rest):
        """`rest`: one nnx.State, or a tuple of them (the frozen base of a LoRA run, the rest)."""
        rest = rest if isinstance(rest, tuple) else (rest,)
        return nnx.merge(self.graphdef, params, biases, *rest)

    @staticmethod
    def fixed_parts(state: dict):
        """The state's non-trained model parts, as `model_of` takes them."""
        return (state["frozen"], state["rest"]) if "frozen" in state else state["rest"]

    # -- schedules of the loss weights (traced step)
    def mtp_lambda(self, step):
        switch = self.loss.mtp_switch * self.total_steps
        return jnp.where(step < switch, self.loss.mtp_weight, self.loss.mtp_weight_late)

    def gamma(self, step):
        stop = self.loss.bias_update_stop * self.total_steps
        return jnp.where(step < stop, self.loss.bias_update_speed, 0.0)

    # -- one microbatch
    def micro_loss(self, params, biases, rest, mb, denom, step, n_micro: int = 1, rng=None):
        """mb: tokens/segments/positions [b, T+1]; denom: global target counts per depth.

        Token losses are divided by the global counts, the per-row-averaged balance terms by the
        number of microbatches, so the sum over microbatches is the global-batch objective.
        `rng`: the step's key (LoRA dropout: one mask for every microbatch of the step).
        """
        if self.lora_dropout > 0 and rng is not None:
            from jaxmoe.lora import dropout_adapters

            params = dropout_adapters(params, jax.random.fold_in(rng, 0x10A), self.lora_dropout)
        if self.tie_mtp:
            params = tie_mtp_embeddings(params)
        model = self.model_of(params, biases, rest)
        ent_sum, n_routers = 0.0, 0
        tok, seg, pos = mb["tokens"], mb["segments"], mb["positions"]
        inputs, positions, seg_in = tok[:, :-1], pos[:, :-1], seg[:, :-1]
        mask = doc_mask(seg_in, positions) if self.doc_masking else None
        out = model.forward(inputs, positions, mask=mask)
        ce = nll_sum(out.logits, tok[:, 1:], target_mask(seg)) / denom[0]
        obj = ce
        aux = {"ce": ce}
        if out.aux:
            aux["counts"] = out.aux["counts"]                    # [L_moe, E]
            bal = out.aux["seq_balance"].sum() / n_micro         # summed over MoE layers
            aux["balance"] = bal
            if self.use_balance:
                obj = obj + self.loss.balance_alpha * bal
            ent_sum = out.aux["score_entropy"].sum()             # [L_moe] -> ()
            n_routers = out.aux["score_entropy"].shape[0]
        if self.use_mtp:
            lgs, mtp_aux = model.mtp_forward(out.hidden, inputs, positions, mask)
            mtp = 0.0
            for k, (lg, a) in enumerate(zip(lgs, mtp_aux), start=1):
                mtp = mtp + nll_sum(lg, tok[:, k + 1:], target_mask(seg, k)) / denom[k]
                aux[f"mtp_counts{k}"] = a["counts"]
                if self.use_balance:
                    obj = obj + self.loss.balance_alpha * a["seq_balance"] / n_micro
                if self.mcfg.is_moe_layer(self.mcfg.num_hidden_layers + k - 1):
                    ent_sum, n_routers = ent_sum + a["score_entropy"], n_routers + 1
            mtp = mtp / len(lgs)
            aux["mtp"] = mtp
            obj = obj + self.mtp_lambda(step) * mtp
        if self.stage is not None:
            # the mean over routers (in [0, ln E] whatever the depth), per microbatch
            sparsity = ent_sum / max(n_routers, 1) / n_micro
            aux["router_entropy"] = jnp.asarray(sparsity, jnp.float32)
            on = (self.phase(step) == 2).astype(jnp.float32)
            obj = obj + on * self.stage.sparsity_weight * sparsity
        aux["objective"] = obj
        return obj, aux

    def denominators(self, seg: jax.Array) -> jax.Array:
        """Global target counts [1 + D]: next token and each MTP depth. seg [A, b, T+1]."""
        flat = seg.reshape(-1, seg.shape[-1])  # [A, b, T+1] -> [A*b, T+1]
        D = self.mcfg.num_nextn_predict_layers if self.use_mtp else 0
        return jnp.stack([jnp.maximum(target_mask(flat, k).sum(), 1.0) for k in range(D + 1)])

    # -- the optimizer step
    def train_step(self, state: dict, batch: dict) -> tuple[dict, dict]:
        params, biases, rest = state["params"], state["biases"], self.fixed_parts(state)
        step, rng = state["step"], state["rng"]
        denom = self.denominators(batch["segments"])
        A = batch["tokens"].shape[0]
        grad_fn = jax.value_and_grad(self.micro_loss, has_aux=True)
        if A == 1:
            mb = jax.tree.map(lambda x: x[0], batch)
            (_, aux), grads = grad_fn(params, biases, rest, mb, denom, step, 1, rng)
        else:
            def body(carry, mb):
                g_acc, a_acc = carry
                (_, a), g = grad_fn(params, biases, rest, mb, denom, step, A, rng)
                return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, a_acc, a)), None

            a0 = jax.eval_shape(lambda: self.micro_loss(
                params, biases, rest, jax.tree.map(lambda x: x[0], batch), denom, step, A, rng)[1])
            a0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), a0)
            g0 = jax.tree.map(jnp.zeros_like, params)
            (grads, aux), _ = jax.lax.scan(body, (g0, a0), batch)
        grad_norm = optax.tree.norm(grads)
        updates, opt = self.tx.update(grads, state["opt"], params)
        params = optax.apply_updates(params, updates)
        if self.tie_mtp:
            params = tie_mtp_embeddings(params)
        metrics = {"loss": aux["ce"], "objective": aux["objective"], "grad_norm": grad_norm,
                   "lr": jnp.asarray(self.lr_fn(step), jnp.float32)}
        if "balance" in aux:
            metrics["balance_loss"] = self.loss.balance_alpha * aux["balance"]
        if "mtp" in aux:
            metrics["mtp_loss"] = aux["mtp"]
            metrics["mtp_lambda"] = self.mtp_lambda(step)
        counts = self.counts_by_bias_path(aux)
        if self.use_bias:
            # staged warm-up: the router (its selection bias too) stays frozen
            gamma = jnp.where(self.phase(step) == 0, 0.0, self.gamma(step)) if self.stage else \
                self.gamma(step)
            biases = bias_update(biases, counts, gamma)
        metrics.update(routing_metrics(aux, biases))
        if "counts" in aux:  # routed (token, expert) pairs per token: K, or fewer under top-p
            n_micro, rows, t1 = batch["tokens"].shape  # [A, b, T+1]
            metrics["experts_per_token"] = aux["counts"].sum(-1) / (n_micro * rows * (t1 - 1))
        if self.stage is not None:
            metrics["phase"] = self.phase(step)
            if "router_entropy" in aux:
                metrics["router_entropy"] = aux["router_entropy"]
        new = dict(state, params=params, biases=biases, opt=opt, step=step + 1,
                   rng=jax.random.fold_in(state["rng"], step))
        return new, metrics

    def counts_by_bias_path(self, aux: dict) -> dict[tuple, jax.Array]:
        """Routing counts keyed by the path of the router bias they steer."""
        out = {}
        if "counts" in aux:
            out[("moe_layers", "ffn", "router", "bias_E")] = aux["counts"]
        for k in range(1, self.mcfg.num_nextn_predict_layers + 1):
            if f"mtp_counts{k}" in aux:
                out[("mtp", k - 1, "layer", "ffn", "router", "bias_E")] = aux[f"mtp_counts{k}"]
        return out

    # -- eval
    def eval_step(self, state: dict, batch: dict) -> tuple[jax.Array, jax.Array]:
        """(sum of next-token NLL, target count) over a batch [A, b, T+1]."""
        model = self.model_of(state["params"], state["biases"], self.fixed_parts(state))
        flat = jax.tree.map(lambda x: x.reshape(-1, x.shape[-1]), batch)  # [A, b, T+1] -> [A*b, T+1]
        tok, seg, pos = flat["tokens"], flat["segments"], flat["positions"]
        mask = doc_mask(seg[:, :-1], pos[:, :-1]) if self.doc_masking else None
        out = model.forward(tok[:, :-1], pos[:, :-1], mask=mask)
        m = target_mask(seg)
        return nll_sum(out.logits, tok[:, 1:], m), m.sum()


def bias_update(biases: nnx.State, counts: dict[tuple, jax.Array], gamma) -> nnx.State:
    """b += gamma * sign(mean load - load), then b -= mean(b), per router (last axis = experts)."""
    flat = dict(nnx.to_flat_state(biases))
    for path, var in flat.items():
        if path not in counts:
            continue
        c = counts[path].astype(jnp.float32)
        b = var.get_value()
        b = b + gamma * jnp.sign(c.mean(-1, keepdims=True) - c)
        flat[path] = var.replace(b - b.mean(-1, keepdims=True))
    return nnx.from_flat_state(list(flat.items()))


DETAIL_MAX = 512  # models with at most this many (MoE layer, expert) pairs log them every step


def routing_metrics(aux: dict, biases: nnx.State) -> dict[str, Any]:
    """Per MoE layer: load imbalance max/mean, dead experts, router bias L2 norm, the global
    expert counts ([L_moe, E]); for small models also the biases themselves."""
    out = {}
    flat = dict(nnx.to_flat_state(biases))
    b = flat.get(("moe_layers", "ffn", "router", "bias_E"))
    if "counts" in aux:
        c = aux["counts"]
        out["load_max_over_mean"] = c.max(-1) / jnp.maximum(c.mean(-1), 1e-9)
        out["dead_experts"] = (c == 0).sum(-1)
        out["expert_counts"] = c  # the trainer writes it every step only up to DETAIL_MAX
        if c.size <= DETAIL_MAX and b is not None:
            out["router_bias"] = b.get_value()
    if b is not None:
        out["router_bias_norm"] = jnp.sqrt((b.get_value() ** 2).sum(-1))
    return out
