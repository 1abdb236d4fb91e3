"""`jaxmoe-generate --ckpt DIR --prompt TEXT [...]` (or `python -m jaxmoe.generate`).

One prompt streams its continuation as it is produced; several (`--prompt` repeated, or
`--prompt-file` with one prompt per line) are decoded as one batch and printed in order when
done. Timings and memory go to stderr with `--stats`. Exit codes: 0 done, 2 bad input (missing
checkpoint, tokenizer not matching the model's vocabulary, prompt too long, ...), reported in
one line naming it.
"""

from __future__ import annotations

import argparse
import os
import sys


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxmoe-generate",
        description="Generate text with a jaxmoe / DeepSeek-V2/V3 checkpoint: prefill, then "
                    "jit-compiled decoding over the absorbed-MLA latent cache.")
    p.add_argument("--ckpt", required=True,
                   help="Hugging Face folder, jaxmoe-convert output or jaxmoe-train workdir")
    p.add_argument("--prompt", action="append", default=[],
                   help="prompt text (repeat for a batch)")
    p.add_argument("--prompt-file", help="a file with one prompt per line (added to --prompt)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="tokenizer.json (default: bytes, ids 0-255, as "
                                       "jaxmoe-train's built-in corpus)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="parameters and compute (default float32)")
    p.add_argument("--fp8", choices=["dequantize", "keep"], default="dequantize",
                   help="FP8 Hugging Face checkpoints: dequantise at load (default) or keep the "
                        "e4m3 weights + 128x128 scales and dequantise inside the matmul path")
    p.add_argument("--int8-experts", action="store_true",
                   help="int8 weight-only routed experts (per output channel scales)")
    p.add_argument("--eos-id", type=int, default=None,
                   help="stop a prompt at this id (default: the config's eos_token_id; -1: never)")
    p.add_argument("--prefill-chunk", type=int, default=256,
                   help="prompt tokens per prefill step (memory grows linearly with the prompt)")
    p.add_argument("--speculative", action="store_true",
                   help="MTP speculative decoding (greedy only; needs the checkpoint's MTP "
                        "module); reports the acceptance rate")
    p.add_argument("--no-stream", action="store_true", help="print when done")
    p.add_argument("--stats", action="store_true",
                   help="print tokens/s, cache and weight bytes to stderr")
    return p


def _prompts(a) -> list[str]:
    prompts = list(a.prompt)
    if a.prompt_file:
        from jaxmoe.generate.engine import GenerateError

        if not os.path.isfile(a.prompt_file):
            raise GenerateError(f"--prompt-file {a.prompt_file}: no such file")
        with open(a.prompt_file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        from jaxmoe.generate.engine import GenerateError

        raise GenerateError("no prompt: pass --prompt TEXT (repeatable) or --prompt-file FILE")
    return prompts


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from jaxmoe.config import ConfigError
    from jaxmoe.generate.engine import GenerateError

    try:
        return _run(a)
    except (GenerateError, ConfigError) as e:
        print(f"jaxmoe-generate: error: {e}", file=sys.stderr)
        return 2


def _run(a) -> int:
    import time

    from jaxmoe.generate import checkpoint, engine
    from jaxmoe.generate.engine import GenerateError
    from jaxmoe.generate.tokenizer import Streamer, load_tokenizer

    prompts = _prompts(a)  # before the (slow) load: a bad invocation fails at once
    if a.speculative and a.temperature != 0:
        raise GenerateError("--speculative decodes greedily: use --temperature 0")
    t0 = time.perf_counter()
    model = checkpoint.load(a.ckpt, dtype=a.dtype, fp8=a.fp8,
                            mtp="auto" if a.speculative else False)
    tk = load_tokenizer(a.tokenizer, model.cfg.vocab_size)
    if a.int8_experts:
        from jaxmoe.quant.int8 import quantize_experts_int8

        model = quantize_experts_int8(model)
    load_s = time.perf_counter() - t0
    ids = [tk.encode(p) for p in prompts]
    eos = engine.USE_CONFIG if a.eos_id is None else (None if a.eos_id < 0 else a.eos_id)
    stream = len(prompts) == 1 and not a.no_stream
    streamer = Streamer(tk)
    out = sys.stdout

    def on_token(step, toks):
        if stream and toks[0] is not None:
            out.write(streamer.push(toks[0]))
            out.flush()

    if stream:
        out.write(prompts[0])
        out.flush()
    kw = dict(temperature=a.temperature, top_p=a.top_p, seed=a.seed, eos_id=eos,
              prefill_chunk=a.prefill_chunk, on_token=on_token)
    if a.speculative:
        from jaxmoe.generate.speculative import run_speculative

        kw.pop("temperature"), kw.pop("top_p"), kw.pop("seed")
        g = run_speculative(model, ids, a.max_new_tokens, **kw)
    else:
        g = engine.run(model, ids, a.max_new_tokens, **kw)
    if stream:
        out.write(streamer.flush() + "\n")
    else:
        for i, (p, new) in enumerate(zip(prompts, g.tokens)):
            out.write(f"--- prompt {i} ---\n{p}{tk.decode(new)}\n")
    out.flush()
    if a.stats:
        _stats(model, g, load_s)
    return 0


def _stats(model, g, load_s: float) -> None:
    from jaxmoe.generate.engine import cache_bytes_per_token
    from jaxmoe.quant import weight_bytes

    new = sum(len(t) for t in g.tokens)
    rows = len(g.tokens)
    lines = [
        f"load {load_s:.1f} s; weights {weight_bytes(model) / 2**20:.1f} MiB",
        f"prefill {g.prompt_tokens} tokens in {g.prefill_s:.2f} s "
        f"({g.prompt_tokens / max(g.prefill_s, 1e-9):.1f} tokens/s, incl. compile on first use)",
        f"decode {max(new - rows, 0)} tokens in {g.decode_steps} steps in {g.decode_s:.2f} s "
        f"({max(new - rows, 0) / max(g.decode_s, 1e-9):.1f} tokens/s, incl. compile on first "
        f"use); {new} new tokens in all",
        f"latent cache {cache_bytes_per_token(model.cfg)} bytes/token; allocated "
        f"{g.cache_bytes / 2**20:.2f} MiB",
    ]
    acc = getattr(g, "acceptance", None)
    if acc is not None:
        lines.append(f"speculative: {acc:.1%} of MTP drafts accepted")
    print("\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
