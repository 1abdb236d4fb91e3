"""`jaxmoe-generate --ckpt DIR --prompt TEXT [...]` (or `python -m jaxmoe.generate`).

One prompt streams its continuation as it is produced; several (`--prompt` repeated, or
`--prompt-file` with one prompt per line) are decoded as one batch and printed in order when
done. Timings and memory go to stderr with `--stats`. Exit codes: 0 done, 2 bad input (missing
checkpoint, tokenizer not matching the model's vocabulary, prompt too long, ...), reported in
one line naming it. Bad input is found before the weights are loaded wherever that can be:
argument values at once, and, but for a jaxmoe-train workdir, what the model config decides
(vocabulary, positions) from the config alone.
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
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="tokens to generate per prompt (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=0,
                   help="sampling seed in [0, 2**32) (default 0; unused when greedy)")
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
                   help="prompt tokens per prefill step (default 256; the step's activation "
                        "memory grows with it, the cache with the prompt)")
    p.add_argument("--speculative", action="store_true",
                   help="MTP speculative decoding (greedy only; needs the checkpoint's MTP "
                        "module); reports the acceptance rate")
    p.add_argument("--no-stream", action="store_true", help="print when done")
    p.add_argument("--stats", action="store_true",
                   help="print tokens/s, cache and weight bytes to stderr")
    return p


def _prompts(a) -> list[str]:
    from jaxmoe.generate.engine import GenerateError

    prompts = list(a.prompt)
    if a.prompt_file:
        prompts += _read_prompt_file(a.prompt_file)
    if not prompts:
        raise GenerateError("no prompt: pass --prompt TEXT (repeatable) or --prompt-file FILE")
    return prompts


def _read_prompt_file(path: str) -> list[str]:
    """The non-blank lines of a UTF-8 file (LF, CRLF or CR line ends)."""
    from jaxmoe.generate.engine import GenerateError

    if not os.path.isfile(path):
        raise GenerateError(f"--prompt-file {path}: no such file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise GenerateError(f"--prompt-file {path}: cannot read it ({e.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise GenerateError(f"--prompt-file {path}: not UTF-8 text: byte 0x{data[e.start]:02x} "
                            f"at offset {e.start} (line {line}): {e.reason}") from None
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return [line for line in lines if line.strip()]


def _check_args(a) -> None:
    """What the arguments alone decide, so that a bad invocation fails before the (slow) load."""
    from jaxmoe.generate import engine

    engine.check_settings(max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                          top_p=a.top_p, seed=a.seed, prefill_chunk=a.prefill_chunk, flags=True)
    if a.speculative and a.temperature != 0:
        raise engine.GenerateError("--speculative decodes greedily: use --temperature 0")
    if a.tokenizer is not None and not os.path.isfile(a.tokenizer):
        raise engine.GenerateError(f"--tokenizer {a.tokenizer}: no such file")


def _peek_config(path: str):
    """The model config of --ckpt without its weights (config.json of a Hugging Face folder, the
    marker of a converted checkpoint); None for a jaxmoe-train workdir, whose model is known
    only once its checkpoint is opened (jaxmoe.train.merge)."""
    from jaxmoe import orbax_io
    from jaxmoe.config import ModelConfig
    from jaxmoe.generate import checkpoint
    from jaxmoe.generate.engine import GenerateError
    from jaxmoe.safetensors_io import CheckpointError

    kind = checkpoint.kind_of(path)
    if kind == "hf":
        return ModelConfig.from_hf_config(os.path.join(path, "config.json"))
    if kind == "orbax":
        try:
            return orbax_io.config_of(orbax_io.read_marker(path))
        except CheckpointError as e:
            raise GenerateError(f"--ckpt {path}: {e}") from None
    return None


def _inputs(a, prompts: list[str], cfg):
    """(tokenizer, prompt ids, eos id) checked against the model config `cfg`."""
    from jaxmoe.generate import engine
    from jaxmoe.generate.tokenizer import load_tokenizer

    tk = load_tokenizer(a.tokenizer, cfg.vocab_size)
    ids = engine.check_prompts([tk.encode(p) for p in prompts], cfg, a.max_new_tokens)
    if a.eos_id is None:
        return tk, ids, engine.USE_CONFIG
    eos = None if a.eos_id == -1 else a.eos_id
    engine.check_eos(eos, cfg.vocab_size, flags=True)
    return tk, ids, eos


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
    from jaxmoe.generate.tokenizer import Streamer

    # everything that can fail without the weights fails before the (slow) load
    prompts = _prompts(a)
    _check_args(a)
    cfg = _peek_config(a.ckpt)
    early = _inputs(a, prompts, cfg) if cfg is not None else None
    t0 = time.perf_counter()
    model = checkpoint.load(a.ckpt, dtype=a.dtype, fp8=a.fp8,
                            mtp="auto" if a.speculative else False)
    if a.speculative and not len(model.mtp):
        raise GenerateError(f"--speculative: --ckpt {a.ckpt} has no MTP module to draft with "
                            "(num_nextn_predict_layers=0 or no MTP tensors in the checkpoint)")
    tk, ids, eos = early or _inputs(a, prompts, model.cfg)
    if a.int8_experts:
        from jaxmoe.quant.int8 import quantize_experts_int8

        model = quantize_experts_int8(model)
    load_s = time.perf_counter() - t0
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
