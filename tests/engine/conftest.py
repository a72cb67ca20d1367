"""Fixtures of the engine tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplex import LLM
from loraplex.bench.overhead import build_assets


@pytest.fixture(scope="module")
def overhead_assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """The tiny model of `loraplex.bench.overhead` (its own byte-level BPE tokenizer) and three adapters."""
    return build_assets(tmp_path_factory.mktemp("overhead"), 3)


@pytest.fixture(scope="module")
def overhead_llm(overhead_assets: tuple[Path, list[Path]]) -> LLM:
    """An engine on that model with a small KV pool and two slots for three adapters: requests get preempted
    and parked."""
    model, _ = overhead_assets
    return LLM(str(model), num_blocks=24, block_size=4, max_loras=2, max_lora_rank=8, max_num_seqs=8,
               adapter_cycle_steps=4)
