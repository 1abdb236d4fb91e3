"""Pallas body of the fused router: one block of tokens [bt, Ep] per grid step.

The same body lowers with Pallas Triton (GPU) and Mosaic (TPU). It uses only elementwise ops and
row reductions (max / min / sum over the expert lanes), never a sort:

- top-k is K rounds of "row max, then the lowest lane holding it", removing that lane each round, which
  is exactly `jax.lax.top_k`'s order (larger first, ties to the lower index);
- groups are lane masks (group id per lane), so no [bt, G, E/G] reshape is needed; the top-2 group score
  removes the first arg-max lane and takes the max again (so a duplicated maximum counts twice, as in
  top_k); the kept groups are chosen the same way over the G group scores;
- lane indices travel as float32 (exact below 2^24) so every reduction is a float reduction.
Padded lanes (lane id -1) are never selected; padded output columns (kcol >= K) stay zero.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxmoe.kernels.router.reference import RouterSpec


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    block_t: int  # tokens per grid step

    @classmethod
    def get_default(cls, platform: str, num_tokens: int, padded_experts: int) -> "BlockSizes":
        if platform == "tpu":
            return cls(block_t=min(128, -(-num_tokens // 8) * 8))
        cap = max(1, 8192 // padded_experts)  # keep [bt, Ep] in registers
        bt = 1
        while bt * 2 <= min(cap, 64, max(num_tokens, 1)):
            bt *= 2
        return cls(block_t=bt)


def router_kernel(logits_ref, bias_ref, lane_ref, gid_ref, kcol_ref, w_ref, ids_ref, scores_ref, *,
                  spec: RouterSpec, has_bias: bool):
    ninf = jnp.float32(-jnp.inf)
    x = logits_ref[...].astype(jnp.float32)  # [bt, Ep]
    lane = lane_ref[...]                     # [1, Ep] expert index (float), -1 on padding
    gid = gid_ref[...]                       # [1, Ep] group index (float), -1 on padding
    kcol = kcol_ref[...]                     # [1, Kp] output column index (float)
    big = jnp.float32(x.shape[-1])
    valid = lane >= 0
    if spec.scoring == "softmax":
        xm = jnp.where(valid, x, ninf)
        ex = jnp.exp(xm - xm.max(-1, keepdims=True))
        s = ex / ex.sum(-1, keepdims=True)
    else:
        s = jax.nn.sigmoid(x)
    scores_ref[...] = s
    sel = s + bias_ref[...] if has_bias else s

    def first_argmax(v, m):  # lowest lane whose value equals the row max m: [bt, 1]
        return jnp.where(v == m, lane, big).min(-1, keepdims=True)

    if spec.n_group > 1:
        scores_g = []
        for g in range(spec.n_group):
            v = jnp.where(gid == g, sel, ninf)
            m1 = v.max(-1, keepdims=True)
            if spec.group_score == "top2":
                i1 = first_argmax(v, m1)
                m1 = m1 + jnp.where(lane == i1, ninf, v).max(-1, keepdims=True)
            scores_g.append(m1)  # [bt, 1]
        chosen = [jnp.zeros_like(scores_g[0]) for _ in scores_g]  # 1.0 once group g is kept
        for _ in range(spec.topk_group):
            best, arg = jnp.full_like(scores_g[0], ninf), jnp.full_like(scores_g[0], -1.0)
            for g, sg in enumerate(scores_g):  # strict '>' in index order: ties go to the lower group
                take = (chosen[g] == 0) & ((sg > best) | (arg < 0))
                best, arg = jnp.where(take, sg, best), jnp.where(take, jnp.float32(g), arg)
            chosen = [jnp.where(arg == g, 1.0, c) for g, c in enumerate(chosen)]
        keep = jnp.zeros_like(sel)
        for g, c in enumerate(chosen):
            keep = jnp.where((gid == g) & (c > 0), 1.0, keep)
        sel = jnp.where(keep > 0, sel, ninf)

    eligible = jnp.broadcast_to(valid, sel.shape)
    w = jnp.zeros((x.shape[0], kcol.shape[-1]), jnp.float32)
    ids = jnp.zeros_like(w)
    for j in range(spec.top_k):
        v = jnp.where(eligible, sel, ninf)
        i = jnp.where(eligible & (v == v.max(-1, keepdims=True)), lane, big).min(-1, keepdims=True)
        wj = jnp.where(lane == i, s, ninf).max(-1, keepdims=True)  # the ORIGINAL score, exactly
        w = jnp.where(kcol == j, wj, w)
        ids = jnp.where(kcol == j, i, ids)
        eligible = eligible & (lane != i)
    if spec.norm:
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    w_ref[...] = w * spec.scale
    ids_ref[...] = ids.astype(jnp.int32)
