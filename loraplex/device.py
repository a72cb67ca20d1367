"""Small host tensors onto a device without the host waiting for the kernels queued there."""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor.to(device)` for a small CPU tensor, without the host waiting. A blocking copy from the host to a
    GPU waits for every kernel already queued on the stream (torch synchronizes it), which would stall a step
    queued ahead of the last one's tokens (async scheduling) until the GPU caught up. The values are staged in
    pinned memory, which the caching host allocator keeps until the copy has run, and copied asynchronously;
    the caller may change or drop `tensor` at once."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    pinned.copy_(tensor)
    return pinned.to(device, non_blocking=True)
