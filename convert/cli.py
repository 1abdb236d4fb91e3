"""`jaxmoe-convert HF_DIR OUT_DIR [options]` and `jaxmoe-convert export ORBAX_DIR HF_DIR`."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _size(text: str) -> int:
    """A positive byte count: 65536, 256M, 1.5G, 64KiB (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(?:I?B)?\s*", text, re.IGNORECASE)
    n = int(float(m[1]) * _UNITS[m[2].upper()]) if m else 0
    if not m or n <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive size "
                                         "(e.g. 65536, 256M, 1.5G)")
    return n


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return n


def _common(p: argparse.ArgumentParser, overwrite: str) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help=overwrite + ". Never replaces any other non-empty folder, nor the input "
                                    "or a folder containing it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def convert_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxmoe-convert",
        description="Convert a Hugging Face DeepSeek-V2/V3 checkpoint (bf16/fp32 or FP8 with "
                    "128x128 block scales) to a jaxmoe Orbax checkpoint, slab by slab. "
                    "`jaxmoe-convert export ORBAX_DIR HF_DIR` writes HF format back.")
    p.add_argument("hf_dir", help="folder with config.json and *.safetensors (+ index.json)")
    p.add_argument("out_dir", help="output Orbax checkpoint folder")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="parameter dtype (default: the source's; FP8 dequantises to bfloat16)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted conversion (OUT_DIR.partial) with the options "
                        "it was started with; it replaces a finished checkpoint at OUT_DIR only "
                        "if that run had --overwrite. Cannot be combined with --overwrite "
                        "(which starts over)")
    p.add_argument("--verify", action="store_true",
                   help="run a short prompt through the result and the source (transformers; "
                        "small models) and print the max relative logit error")
    p.add_argument("--mtp", choices=["auto", "yes", "no"], default="auto",
                   help="convert the MTP layer (layer num_hidden_layers): auto = if present")
    p.add_argument("--keep-fp8", action="store_true",
                   help="store FP8 weights as they are (e4m3 + 128x128 scales) for FP8-weight "
                        "inference (jaxmoe.load_model gives FP8Block weights); --dtype then "
                        "applies to the other tensors")
    p.add_argument("--max-slab", type=_size, default="256M",
                   help="split plain tensors into row blocks of at most this size (256M)")
    p.add_argument("--batch", type=_size, default="256M",
                   help="bytes staged per OCDBT commit (two batches in memory at most)")
    p.add_argument("--workers", type=_positive, default=min(4, os.cpu_count() or 1),
                   help="threads computing slabs (default: min(4, CPUs))")
    _common(p, "start over: discard an interrupted run (OUT_DIR.partial) and, when done, "
               "replace a finished jaxmoe/Orbax checkpoint at OUT_DIR")
    return p


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxmoe-convert export",
                                description="Write a jaxmoe Orbax checkpoint back in Hugging "
                                            "Face format: config.json and safetensors, sharded "
                                            "with model.safetensors.index.json when larger than "
                                            "--max-shard-size, else one model.safetensors.")
    p.add_argument("orbax_dir")
    p.add_argument("hf_dir")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="tensor dtype (router e_score_correction_bias stays float32)")
    p.add_argument("--max-shard-size", type=_size, default="5G",
                   help="largest safetensors shard (5G)")
    _common(p, "when done, replace a Hugging Face checkpoint at HF_DIR (a folder with "
               "config.json and model*.safetensors; the whole folder is replaced)")
    return p


class _Bar:
    """tqdm over output bytes (rate, ETA), with a finished-tensors counter."""

    def __init__(self, enabled: bool, desc: str):
        self.enabled, self.desc, self.bar = enabled, desc, None

    def __call__(self, total_bytes: int, done_bytes: int, tensors: int, done_tensors: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total_bytes, initial=done_bytes, unit="B", unit_scale=True,
                        unit_divisor=1024, desc=self.desc, dynamic_ncols=True,
                        disable=not self.enabled, file=sys.stderr)
        state = [done_tensors]

        def tick(nbytes: int, tensor_done: bool):
            state[0] += tensor_done
            self.bar.update(nbytes)
            self.bar.set_postfix_str(f"tensors {state[0]}/{tensors}", refresh=False)

        return tick

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _summary(kind: str, st) -> str:
    gbs = st.out_bytes / max(st.seconds, 1e-9) / 1e9
    return (f"{kind}: {st.tensors} tensors ({st.slabs} slabs written, {st.skipped} resumed), "
            f"read {st.src_bytes / 1e9:.3f} GB, wrote {st.out_bytes / 1e9:.3f} GB, "
            f"{st.params:,} parameters, {st.seconds:.1f} s, {gbs:.3f} GB/s written "
            f"({st.src_bytes / max(st.seconds, 1e-9) / 1e9:.3f} GB/s read)")


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the process entry point (tests pass argv and stay in-process)
        from convert import hugepages

        hugepages.ensure()
    argv = list(sys.argv[1:] if argv is None else argv)
    from jaxmoe.safetensors_io import CheckpointError  # (after the re-exec: imports jax)

    if not os.environ.get("JAX_PLATFORMS"):
        import jax  # the conversion's XLA kernels run on the CPU: leave accelerators alone

        jax.config.update("jax_platforms", "cpu")
    try:
        if argv and argv[0] == "export":
            return _export(export_parser().parse_args(argv[1:]))
        parser = convert_parser()
        a = parser.parse_args(argv)
        if a.resume and a.overwrite:
            parser.error("--resume and --overwrite contradict each other: --resume continues "
                         f"{a.out_dir}.partial, --overwrite discards it and starts over; "
                         "pass one of them")
        return _convert(a)
    except CheckpointError as e:
        print(f"jaxmoe-convert: error: {e}", file=sys.stderr)
        return 2


def _convert(a) -> int:
    from convert.pipeline import convert

    bar = _Bar(not a.no_progress, "convert")
    try:
        st = convert(a.hf_dir, a.out_dir, dtype=a.dtype, resume=a.resume, overwrite=a.overwrite,
                     workers=a.workers, mtp=a.mtp, max_slab_bytes=a.max_slab,
                     batch_bytes=a.batch, progress=bar, keep_fp8=a.keep_fp8)
    finally:
        bar.close()
    print(_summary("converted", st))
    print(f"wrote {os.path.abspath(a.out_dir)}")
    if a.verify:
        from convert.verify import verify

        t = time.perf_counter()
        err = verify(a.hf_dir, a.out_dir)
        if err is not None:
            print(f"verify: max relative logit error {err:.3e} "
                  f"({time.perf_counter() - t:.1f} s)")
    return 0


def _export(a) -> int:
    from convert.export import export

    bar = _Bar(not a.no_progress, "export")
    try:
        st = export(a.orbax_dir, a.hf_dir, dtype=a.dtype, max_shard_bytes=a.max_shard_size,
                    overwrite=a.overwrite, progress=bar)
    finally:
        bar.close()
    print(_summary("exported", st))
    print(f"wrote {os.path.abspath(a.hf_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
