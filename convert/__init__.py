"""HF safetensors <-> Orbax conversion: `jaxmoe-convert HF_DIR OUT_DIR` / `python -m convert`.

source (shards, headers, per-tensor memory maps) -> plan (arrays and slabs from the one
`jaxmoe.hf_mapping` table) -> pipeline (validate, dequantise/transform on worker threads) ->
writer (tensorstore zarr on OCDBT, batched commits, journal, atomic install); export writes
Hugging Face format back; synth writes synthetic published-format checkpoints.
"""


def __getattr__(name):  # lazy: `jaxmoe-convert` re-executes itself before importing jax
    if name in ("Entry", "entries"):
        from jaxmoe import hf_mapping

        return getattr(hf_mapping, name)
    raise AttributeError(f"module 'convert' has no attribute {name!r}")
