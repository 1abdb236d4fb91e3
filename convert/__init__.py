"""HF safetensors <-> Orbax conversion (the streaming CLI lands with the converter issue).

The name/shape table it walks is `jaxmoe.hf_mapping`, shared with `jaxmoe.load_model`.
"""

from jaxmoe.hf_mapping import Entry, entries  # noqa: F401
