"""The kernel benchmark's CPU behaviour: it needs CUDA, and without one says so and returns normally."""

from __future__ import annotations

import pytest
import torch

from loraplex.bench.kernels import main


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_without_cuda_says_a_gpu_is_needed(capsys: pytest.CaptureFixture[str]) -> None:
    main([])
    assert "needs a CUDA device" in capsys.readouterr().out
