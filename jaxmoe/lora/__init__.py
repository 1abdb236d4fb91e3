"""LoRA adapters for DeepseekV3 in weight space (see adapter.py and attach.py)."""

from jaxmoe.lora.adapter import LoRAWeight
from jaxmoe.lora.attach import (DEFAULT_TARGETS, TARGETS, LoraSpec, adapted, attach, count,
                                dropout_adapters, has_adapters, merge)

__all__ = ["LoRAWeight", "LoraSpec", "TARGETS", "DEFAULT_TARGETS", "attach", "adapted", "merge",
           "has_adapters", "dropout_adapters", "count"]
