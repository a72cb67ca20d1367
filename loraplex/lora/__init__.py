"""LoRA adapters: reading PEFT adapters (adapter.py); layers, ops and batching come later."""

from loraplex.lora.adapter import (
    LAYER_TARGETS,
    AdapterError,
    AdapterInvalid,
    AdapterNotFound,
    AdapterWeights,
    LoRAModule,
    load_adapter,
)

__all__ = [
    "LAYER_TARGETS",
    "AdapterError",
    "AdapterInvalid",
    "AdapterNotFound",
    "AdapterWeights",
    "LoRAModule",
    "load_adapter",
]
