"""LoRA delta ops behind a small backend registry; every backend matches `add_lora_reference`."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from loraplex.lora.batch import LoRABatch
from loraplex.lora.ops.cpu import add_lora
from loraplex.lora.ops.reference import add_lora_reference

log = logging.getLogger(__name__)

AddLoRA = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, LoRABatch,
     torch.Tensor | None],
    torch.Tensor,
]
"""(out, x, a, b, ranks, scales, batch, blocks) -> out, with the delta added in place."""


def _triton_op() -> AddLoRA:
    # Imported on selection only: triton is an optional GPU dependency, and importing it costs seconds.
    try:
        from loraplex.lora.ops.triton_ops import add_lora_triton
    except ImportError as exc:
        raise ValueError(f"LoRA op backend 'triton' needs the triton package, which failed to import: {exc}") \
            from exc
    import triton

    if not (torch.cuda.is_available() or triton.knobs.runtime.interpret):
        raise ValueError("LoRA op backend 'triton' needs a CUDA device (or TRITON_INTERPRET=1 to test on CPU)")
    return add_lora_triton


def _native_op() -> AddLoRA:
    from loraplex.lora.ops.native import NativeUnavailable, add_lora_native, load_kernel

    try:
        load_kernel()
    except NativeUnavailable as exc:
        raise ValueError(f"LoRA op backend 'native' is unavailable: {exc}") from exc
    return add_lora_native


def _auto_op() -> AddLoRA:
    try:
        return _native_op()
    except ValueError as exc:
        log.warning("%s; using the 'torch' backend", exc)
        return add_lora


def resolve_lora_backend(backend: str, device: torch.device) -> str:
    """`backend` with `auto` decided for `device`: on CUDA `triton` where triton imports (else `torch`),
    elsewhere `native` where its kernel builds (else `torch`); ValueError for a backend that cannot run."""
    if backend != "auto":
        get_lora_op(backend)
        return backend
    choice = "triton" if device.type == "cuda" else "native"
    try:
        get_lora_op(choice)
    except ValueError as exc:
        log.warning("%s; using the 'torch' backend", exc)
        return "torch"
    return choice


LORA_OP_BACKENDS: dict[str, Callable[[], AddLoRA]] = {
    "auto": _auto_op,
    "native": _native_op,
    "reference": lambda: add_lora_reference,
    "torch": lambda: add_lora,
    "triton": _triton_op,
}
"""Backend name -> loader of its `add_lora`; a loader raises ValueError when its backend cannot run here."""


def get_lora_op(backend: str) -> AddLoRA:
    """The `add_lora` implementation registered under `backend`."""
    try:
        loader = LORA_OP_BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown LoRA op backend {backend!r}; known: {sorted(LORA_OP_BACKENDS)}") from None
    return loader()


__all__ = ["LORA_OP_BACKENDS", "AddLoRA", "add_lora", "add_lora_reference", "get_lora_op", "resolve_lora_backend"]
