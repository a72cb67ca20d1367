"""dtype -> (atol, rtol) for comparing a kernel with its torch reference, shared by the kernel tests.

Both sides round to the dtype, so the bounds are a few units in the last place at the values the
tests produce (magnitudes up to ~10): bfloat16 keeps 8 significant bits, float16 11, float32 24.
"""

from __future__ import annotations

import torch

TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (1e-3, 5e-3),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """assert_close with the tolerance of `expected`'s dtype."""
    atol, rtol = TOLERANCES[expected.dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
