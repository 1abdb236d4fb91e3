"""Conversion benchmark: synthetic DeepSeek-V3-format FP8 checkpoints (real tensor names, e4m3fn
weights with 128x128 float32 block scales, bf16 rest, MTP layer, sharded + index.json) at reduced
depth/width, converted with `python -m convert` in a child process.

For each size it reports the conversion's time as a ratio to plain read+write copies in the
same run (each in its own child process, 16 MiB buffer, fsync'd): a copy of the source files,
and an I/O-matched copy that reads the source and writes as many bytes as the conversion writes
(FP8 -> bf16 doubles most tensors); and the same conversion with `--keep-fp8`, which writes as
many bytes as it reads, against the copy of the source. Peak RSS is each child's VmHWM (a
getrusage in a forked child would inherit the parent's high-water mark). Widths are fixed, so
every size has the same slab sizes: the peak must not grow with the checkpoint. Each size runs
`--rounds` rounds of the four (rotated order, `sync` before each child); the medians are
reported. With two sizes or more, a "marginal" row compares the differences between the
smallest and the largest: the throughput a large conversion approaches, once its fixed costs
(interpreter start, imports, XLA compiles, the last commit) no longer count.

    python bench/bench_convert.py --sizes 1 4 --dir /tmp/bench_convert --out /tmp/conv.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# Reduced width: the V3 topology (MLA with q/kv LoRA, 1 dense + N MoE layers, shared expert,
# noaux_tc router, 1 MTP layer) at hidden 2048, 64 experts of 1024.
WIDTH = dict(vocab_size=32768, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1024,
             first_k_dense_replace=1, num_nextn_predict_layers=1, num_attention_heads=16,
             n_routed_experts=64, n_shared_experts=1, num_experts_per_tok=8, n_group=8,
             topk_group=4, q_lora_rank=768, kv_lora_rank=512, qk_nope_head_dim=128,
             qk_rope_head_dim=64, v_head_dim=128)
REAL_BYTES = 688_574_839_360  # the published 671B checkpoint (dsv3-spec §7)


def config_for(gb: float):
    """The layer count whose checkpoint size is nearest `gb` GB."""
    import jaxmoe
    from convert import synth

    def size(layers):
        cfg = jaxmoe.ModelConfig(num_hidden_layers=layers, **WIDTH)
        return cfg, sum(math.prod(s) * d.itemsize for _, d, s in synth.tensor_specs(cfg, True))

    return min((size(n) for n in range(2, 64)), key=lambda cs: abs(cs[1] - gb * 1e9))


def generate(gb: float, path: str) -> None:
    from convert import synth

    cfg, _ = config_for(gb)
    synth.write_checkpoint(path, cfg, fp8=True, max_shard_bytes=1 << 30)


WRAP = """
import os, sys
sys.argv = {argv!r}
try:
    {body}
finally:
    sys.stdout.flush()
    import resource
    ru = resource.getrusage(resource.RUSAGE_SELF)
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
    print("CPU_S=%.3f" % (ru.ru_utime + ru.ru_stime))
    print("PEAK_RSS=%d" % (int(hwm) * 1024))
"""

# Plain copy, 16 MiB buffer, fsync per file. `extra`: bytes written again after each file, so
# the copy writes as many bytes as the conversion does (FP8 -> bf16 doubles most tensors).
COPY = """
src, dst, extra = {src!r}, {dst!r}, {extra!r}
os.makedirs(dst)
buf = bytearray(16 << 20)
v = memoryview(buf)
total = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src))
for f in sorted(os.listdir(src)):
    owe = int(os.path.getsize(os.path.join(src, f)) * extra / total)
    with open(os.path.join(src, f), "rb", buffering=0) as a, \
            open(os.path.join(dst, f), "wb", buffering=0) as b:
        while True:
            n = a.readinto(buf)
            if not n:
                break
            b.write(v[:n])
            k = min(n, owe)
            if k:
                b.write(v[:k])
                owe -= k
        os.fsync(b.fileno())
"""


def run_child(cmd: list[str], env=None) -> tuple[float, int, str]:
    """(seconds, peak RSS bytes, stdout) of one child process; the child prints its CPU
    seconds and its VmHWM (the high-water RSS of its address space) last."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
    out, err = p.communicate()
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"{cmd} failed: {err.decode()[-2000:]}")
    rss = int(out.decode().strip().splitlines()[-1].split("PEAK_RSS=")[1])
    return dt, rss, out.decode()


def child(body: str, argv=()) -> list[str]:
    return [sys.executable, "-c",
            WRAP.format(argv=["x", *argv], body=body.strip().replace("\n", "\n    "))]


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def bench_size(gb: float, root: str, workers: int, rounds: int) -> dict:
    d = os.path.join(root, f"{gb:g}gb")
    shutil.rmtree(d, ignore_errors=True)
    src = os.path.join(d, "hf")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    gen_s, _, _ = run_child(child(f"sys.path.insert(0, {REPO!r} + '/bench')\n"
                                  f"import bench_convert\nbench_convert.generate({gb}, {src!r})"),
                            env)
    src_bytes = du(src)
    out, cp = os.path.join(d, "orbax"), os.path.join(d, "c")
    body = "from convert.cli import main\nrc = main()\nassert rc == 0, rc"
    conv_argv = [src, out, "--no-progress", "--workers", str(workers)]
    runs: dict = {"copy": [], "copy_io": [], "convert": [], "keep": []}
    out_bytes = keep_bytes = None

    def one(kind):
        nonlocal out_bytes, keep_bytes
        os.sync()  # no dirty pages of the previous child left to flush during this one
        if kind == "convert":
            r = run_child(child(body, conv_argv), env)
            out_bytes = du(out)
            shutil.rmtree(out)
        elif kind == "keep":  # FP8 kept as published: writes as many bytes as it reads
            r = run_child(child(body, conv_argv + ["--keep-fp8"]), env)
            keep_bytes = du(out)
            shutil.rmtree(out)
        else:
            extra = 0 if kind == "copy" else out_bytes - src_bytes
            r = run_child(child(COPY.format(src=src, dst=cp, extra=extra)), env)
            shutil.rmtree(cp)
        runs[kind].append(r)

    # rounds in rotated order (the conversion first in round 0: the I/O-matched copy needs its
    # output size), so no case always runs right after the same other case
    order = ["convert", "copy", "copy_io", "keep"]
    for i in range(rounds):
        for kind in order[i % 4:] + order[:i % 4]:
            one(kind)
    med = lambda xs: statistics.median(xs)  # noqa: E731
    conv_s = med([r[0] for r in runs["convert"]])
    cpu = [float(r[2].split("CPU_S=")[1].split()[0]) for r in runs["convert"]]
    copy_s, io_s = med([r[0] for r in runs["copy"]]), med([r[0] for r in runs["copy_io"]])
    keep_s = med([r[0] for r in runs["keep"]])
    summary = [line for line in runs["convert"][0][2].splitlines() if line.startswith("converted")]
    shutil.rmtree(d)
    return dict(size_gb=src_bytes / 1e9, out_gb=out_bytes / 1e9, generate_s=gen_s, rounds=rounds,
                convert_s=conv_s, copy_s=copy_s, copy_io_s=io_s,
                convert_runs_s=[r[0] for r in runs["convert"]],
                copy_runs_s=[r[0] for r in runs["copy"]],
                copy_io_runs_s=[r[0] for r in runs["copy_io"]],
                keep_s=keep_s, keep_runs_s=[r[0] for r in runs["keep"]], keep_gb=keep_bytes / 1e9,
                ratio_keep=copy_s / keep_s,
                keep_peak_rss_gb=max(r[1] for r in runs["keep"]) / 1e9,
                convert_gbs=src_bytes / conv_s / 1e9, copy_gbs=src_bytes / copy_s / 1e9,
                ratio=copy_s / conv_s, ratio_io=io_s / conv_s,
                convert_peak_rss_gb=max(r[1] for r in runs["convert"]) / 1e9,
                convert_cpu_s=med(cpu), convert_cpu_s_per_gb=med(cpu) / (src_bytes / 1e9),
                copy_peak_rss_gb=max(r[1] for k in ("copy", "copy_io") for r in runs[k]) / 1e9,
                summary=summary[0] if summary else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[1.0, 4.0],
                    help="checkpoint sizes to generate, GB of source")
    ap.add_argument("--dir", default="/tmp/bench_convert", help="scratch folder (sources, outputs)")
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                    help="the converter's --workers")
    ap.add_argument("--rounds", type=int, default=3, help="copy / I/O-matched copy / convert "
                    "rounds per size (medians reported)")
    ap.add_argument("--out", default=None, help="write the markdown table here too")
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    results = [bench_size(gb, a.dir, a.workers, a.rounds) for gb in a.sizes]
    lines = [f"CPUs: {os.cpu_count()}, workers: {a.workers}; times are whole child processes "
             "(interpreter start, imports and XLA compiles included); median of "
             f"{a.rounds} rotated rounds (each run listed in the JSON)", "",
             "| source | output | copy of source | I/O-matched copy | convert | ratio vs copy | "
             "ratio vs I/O-matched | convert CPU | convert peak RSS | copy peak RSS |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['size_gb']:.2f} GB | {r['out_gb']:.2f} GB | {r['copy_s']:.1f} s | "
                     f"{r['copy_io_s']:.1f} s | {r['convert_s']:.1f} s ({r['convert_gbs']:.3f} "
                     f"GB/s) | {r['ratio']:.2f} | {r['ratio_io']:.2f} | {r['convert_cpu_s']:.1f} "
                     f"CPU-s ({r['convert_cpu_s_per_gb']:.1f}/GB) | "
                     f"{r['convert_peak_rss_gb']:.2f} GB | {r['copy_peak_rss_gb']:.2f} GB |")
    if len(results) > 1:  # what a large conversion approaches: the fixed costs drop out
        a0, a1 = results[0], results[-1]
        d = {k: a1[k] - a0[k] for k in ("size_gb", "out_gb", "copy_s", "copy_io_s", "convert_s",
                                         "convert_cpu_s")}
        lines.append(f"| marginal, {a0['size_gb']:.2f} → {a1['size_gb']:.2f} GB | "
                     f"+{d['out_gb']:.2f} GB | +{d['copy_s']:.1f} s | +{d['copy_io_s']:.1f} s | "
                     f"+{d['convert_s']:.1f} s ({d['size_gb'] / d['convert_s']:.3f} GB/s) | "
                     f"{d['copy_s'] / d['convert_s']:.2f} | {d['copy_io_s'] / d['convert_s']:.2f} | "
                     f"+{d['convert_cpu_s']:.1f} CPU-s ({d['convert_cpu_s'] / d['size_gb']:.1f}/GB) "
                     "| | |")
    lines += ["", "With `--keep-fp8` (the e4m3 weights and their scales stored as published: as many "
              "bytes written as read, so the copy of the source is the like-for-like baseline):", "",
              "| source | output | copy of source | convert --keep-fp8 | ratio vs copy | peak RSS |",
              "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['size_gb']:.2f} GB | {r['keep_gb']:.2f} GB | {r['copy_s']:.1f} s | "
                     f"{r['keep_s']:.1f} s | {r['ratio_keep']:.2f} | {r['keep_peak_rss_gb']:.2f} GB |")
    if len(results) > 1:
        dk, dc = a1["keep_s"] - a0["keep_s"], a1["copy_s"] - a0["copy_s"]
        lines.append(f"| marginal, {a0['size_gb']:.2f} → {a1['size_gb']:.2f} GB | "
                     f"+{a1['keep_gb'] - a0['keep_gb']:.2f} GB | +{dc:.1f} s | +{dk:.1f} s | "
                     f"{dc / dk:.2f} | |")
    best = min(r["convert_gbs"] for r in results)
    cpu = max(r["convert_cpu_s_per_gb"] for r in results)
    if len(results) > 1:  # marginal cost, without the fixed start-up (imports, XLA compiles)
        a0, a1 = results[0], results[-1]
        cpu = (a1["convert_cpu_s"] - a0["convert_cpu_s"]) / (a1["size_gb"] - a0["size_gb"])
    lines += ["", f"At the slowest measured rate ({best:.3f} GB/s of source) the 689 GB "
              f"checkpoint would take {REAL_BYTES / (best * 1e9) / 3600:.1f} h here; it needs "
              f"about {cpu * REAL_BYTES / 1e9 / 3600:.1f} CPU-hours ({cpu:.1f} CPU-s per GB of "
              "source, marginal), spread over the --workers threads and tensorstore's."]
    text = "\n".join(lines)
    print(text)
    print(json.dumps(results, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n\n" + json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
