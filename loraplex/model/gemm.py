"""How the decoder's linear layers multiply: ATen's matmul, or oneDNN with each weight prepacked.

    aten     `x @ weight_t` on a `[in, out]` copy of the weight (every device)
    onednn   the weight reordered once, at load, into oneDNN's blocked layout for the CPU it runs on,
             then `torch.ops.mkldnn._linear_pointwise` per call (CPU, float32)
    auto     onednn where it is supported, else aten

At decode batch sizes a CPU step is the model's GEMMs streaming every weight from memory; ATen's
matmul re-reads a plain row-major weight, while the prepacked one is laid out in the tiles the kernel
reads. On a 2-core AMD EPYC (Zen 3, AVX2), SmolLM2-135M at 32 sequences: the per-layer GEMMs 1.3–1.6×
faster and the 49,152-row LM head ~3× (docs/benchmarks.md). The results differ from ATen's by float
rounding only (another summation order). The cost: a tied LM head needs its own packed copy of the
embedding table (the lookup keeps the plain one), vocab × hidden × 4 bytes more host memory.
"""

from __future__ import annotations

import torch

BACKENDS = ("auto", "aten", "onednn")
PACK_BATCH_HINT = 256
"""The batch size oneDNN picks the weight's blocked layout for; any batch size runs on it."""


def onednn_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch build can run prepacked oneDNN linears for weights on `device` in `dtype`."""
    if device.type != "cpu" or dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    return hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")


def bf16_native(device: torch.device) -> bool:
    """Whether prepacked oneDNN linears multiply bfloat16 natively here (a CPU with AVX-512 BF16 or AMX)."""
    ops = torch.ops.mkldnn
    return (onednn_supported(device, torch.float32) and hasattr(ops, "_is_mkldnn_bf16_supported")
            and bool(ops._is_mkldnn_bf16_supported()))


def resolve(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend `backend` means for weights on `device` in `dtype` (`auto` decides here)."""
    if backend not in BACKENDS:
        raise ValueError(f"linear_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    supported = onednn_supported(device, dtype)
    if backend == "auto":
        return "onednn" if supported else "aten"
    if backend == "onednn" and not supported:
        raise ValueError(f"linear_backend 'onednn' needs float32 weights on the CPU and a torch built with "
                         f"oneDNN (mkldnn); this model is {dtype} on {device}: use 'aten' or 'auto'")
    return backend


def prepack(weight: torch.Tensor) -> torch.Tensor:
    """`weight` `[out, in]` reordered for `linear` (a new tensor; the original can be freed)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_BATCH_HINT)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`x @ weightᵀ + bias` for `x` `[tokens, in]` and a weight from `prepack` (or a plain `[out, in]` float32
    one, which oneDNN reorders per call: int4 layers' decoded weights, loraplex/model/quant.py)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def unpack_t(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """The plain `[in, out]` weight back from `prepack`'s result: the linear of the identity, exact (each
    output is one weight times 1 plus zeros). For rare uses (DoRA factors at adapter load)."""
    return linear(torch.eye(in_features, dtype=packed.dtype, device=packed.device), packed, None)
