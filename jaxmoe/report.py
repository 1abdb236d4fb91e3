"""`jaxmoe-report WORKDIR`: the expert-load report of a training run, from its metrics.jsonl.

    jaxmoe-report runs/tiny                        # -> runs/tiny/expert_load.png
    jaxmoe-report runs/tiny --out load.png --last 100

One PNG with
- a heatmap of the token share of every expert in every MoE layer (layers x experts, the
  `expert_counts` of the chosen steps summed, each layer's row normalised to 100%; uniform is
  100/E %), from the counts the trainer logs every step for small models (at most 512
  (layer, expert) pairs) or every `--log.counts_every` steps for larger ones;
- the imbalance curve: max/mean expert load per MoE layer over the steps (`load_max_over_mean`),
  with the experts per token (top-p routing) and the staged-training phases when logged.
A short text summary goes to stdout.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def load(workdir: str) -> list[dict]:
    from jaxmoe.train.metrics import read_metrics

    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir}: no metrics.jsonl (not a jaxmoe-train workdir?)")
    recs = [r for r in read_metrics(path) if "step" in r]
    if not recs:
        raise ValueError(f"{path}: no step records")
    return recs


def token_share(recs: list[dict], last: int = 0) -> tuple[np.ndarray, list[int]] | None:
    """([L, E] share of each layer's routed pairs per expert, the steps summed) or None."""
    rows = [r for r in recs if "expert_counts" in r]
    if last:
        rows = rows[-last:]
    if not rows:
        return None
    c = np.sum([np.asarray(r["expert_counts"], np.float64) for r in rows], axis=0)
    c = np.atleast_2d(c)  # [L, E]
    return c / np.maximum(c.sum(-1, keepdims=True), 1.0), [r["step"] for r in rows]


def series(recs: list[dict], key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(steps [S], values [S, L]) of a per-layer metric."""
    rows = [r for r in recs if key in r]
    if not rows:
        return None
    return (np.array([r["step"] for r in rows]),
            np.array([np.atleast_1d(r[key]) for r in rows], np.float64))


def summary(recs: list[dict], share) -> list[str]:
    out = [f"{len(recs)} steps ({recs[0]['step']}..{recs[-1]['step']})"]
    imb = series(recs, "load_max_over_mean")
    if imb is not None:
        out.append("max/mean load, last step: " + ", ".join(f"{x:.2f}" for x in imb[1][-1]))
    if share is not None:
        s, steps = share
        E = s.shape[1]
        for i, row in enumerate(s):
            out.append(f"MoE layer {i}: busiest expert {row.argmax()} {100 * row.max():.1f}%, "
                       f"idlest {row.argmin()} {100 * row.min():.1f}% (uniform {100 / E:.1f}%)")
    ept = series(recs, "experts_per_token")
    if ept is not None:
        out.append("experts per token, last step: " + ", ".join(f"{x:.2f}" for x in ept[1][-1]))
    return out


def render(recs: list[dict], out: str, last: int = 0, title: str = "") -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    share = token_share(recs, last)
    fig, (ax_h, ax_c) = plt.subplots(2, 1, figsize=(10, 8.5),
                                     gridspec_kw={"height_ratios": [1.1, 1]})
    if share is not None:
        s, steps = share
        L, E = s.shape
        im = ax_h.imshow(100 * s, aspect="auto", cmap="viridis", interpolation="nearest")
        fig.colorbar(im, ax=ax_h, label="token share (%)")
        ax_h.set_xlabel(f"expert (uniform = {100 / E:.2f}%)")
        ax_h.set_ylabel("MoE layer")
        ax_h.set_yticks(range(L))
        if E <= 32:
            ax_h.set_xticks(range(E))
        ax_h.set_title(f"expert load, steps {steps[0]}..{steps[-1]} ({len(steps)} summed)")
    else:
        ax_h.axis("off")
        ax_h.text(0.5, 0.5, "no expert_counts in metrics.jsonl\n(models above 512 layer x expert "
                  "pairs log them with --log.counts_every N)", ha="center", va="center")
    imb = series(recs, "load_max_over_mean")
    if imb is not None:
        x, y = imb
        for i in range(y.shape[1]):
            ax_c.plot(x, y[:, i], lw=0.8, alpha=0.6, label=f"layer {i}" if y.shape[1] <= 8 else None)
        ax_c.plot(x, y.mean(1), lw=2.0, color="black", label="mean over layers")
        ax_c.axhline(1.0, color="gray", ls=":", lw=1)
        ax_c.set_ylabel("max / mean expert load")
        ax_c.legend(loc="upper right", fontsize=7, ncol=3)
    ax_c.set_xlabel("step")
    ax_c.set_title("load imbalance")
    ept = series(recs, "experts_per_token")
    if ept is not None and np.ptp(ept[1]) > 1e-6:
        ax2 = ax_c.twinx()
        ax2.plot(ept[0], ept[1].mean(1), color="tab:red", lw=1.2)
        ax2.set_ylabel("experts per token", color="tab:red")
    ph = [(r["step"], r["phase"]) for r in recs if "phase" in r]
    if ph:
        from jaxmoe.train.staged import PHASES

        colors = ("tab:orange", None, "tab:green")
        start = 0
        for i, (st, p) in enumerate(ph):
            if i + 1 == len(ph) or ph[i + 1][1] != p:
                if colors[p]:
                    ax_c.axvspan(ph[start][0] - 0.5, st + 0.5, color=colors[p], alpha=0.12,
                                 label=PHASES[p])
                start = i + 1
        ax_c.legend(loc="upper right", fontsize=7, ncol=3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return summary(recs, share)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="jaxmoe-report", description=__doc__.split("\n\n")[0])
    ap.add_argument("workdir", help="a jaxmoe-train workdir (with metrics.jsonl)")
    ap.add_argument("--out", default=None, help="PNG path (default WORKDIR/expert_load.png)")
    ap.add_argument("--last", type=int, default=0, help="heatmap over the last N logged steps")
    args = ap.parse_args(argv)
    try:
        recs = load(args.workdir)
    except (FileNotFoundError, ValueError) as e:
        print(f"jaxmoe-report: error: {e}", file=sys.stderr)
        return 2
    out = args.out or os.path.join(args.workdir, "expert_load.png")
    lines = render(recs, out, args.last, title=os.path.basename(os.path.abspath(args.workdir)))
    print("\n".join(lines))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
