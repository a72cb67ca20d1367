"""LoRA delta ops behind a small backend registry; every backend matches `add_lora_reference`."""

from __future__ import annotations

from collections.abc import Callable

import torch

from loraplex.lora.batch import LoRABatch
from loraplex.lora.ops.cpu import add_lora
from loraplex.lora.ops.reference import add_lora_reference

AddLoRA = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, LoRABatch],
    torch.Tensor,
]
"""(out, x, a, b, ranks, scales, batch) -> out, with the delta added in place."""

LORA_OP_BACKENDS: dict[str, AddLoRA] = {
    "reference": add_lora_reference,
    "torch": add_lora,
}


def get_lora_op(backend: str) -> AddLoRA:
    """The `add_lora` implementation registered under `backend`."""
    try:
        return LORA_OP_BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown LoRA op backend {backend!r}; known: {sorted(LORA_OP_BACKENDS)}") from None


__all__ = ["LORA_OP_BACKENDS", "AddLoRA", "add_lora", "add_lora_reference", "get_lora_op"]
