"""HF safetensors <-> Orbax conversion: `jaxmoe-convert HF_DIR OUT_DIR` / `python -m convert`.

source (shards, headers, per-tensor memory maps) -> plan (arrays and slabs from the one
`jaxmoe.hf_mapping` table) -> pipeline (validate, dequantise/transform on worker threads) ->
writer (tensorstore zarr on OCDBT, batched commits, journal, atomic install); export writes
Hugging Face format back; synth writes synthetic published-format checkpoints.
"""

from jaxmoe.hf_mapping import Entry, entries  # noqa: F401
