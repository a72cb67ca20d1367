"""Sizing the KV cache from device memory (loraplex/engine/memory.py): the arithmetic, the CPU default, and
a clear error when nothing is left. tests/gpu/test_cuda.py sizes a real cache on CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraplex.config import CacheConfig
from loraplex.engine import memory
from loraplex.engine.memory import CPU_KV_CACHE_BYTES, kv_budget_bytes, size_kv_cache
from loraplex.model.prefill import run_prefill

GIB = 2 ** 30


def test_the_budget_is_utilization_less_what_is_used_and_the_activation_peak() -> None:
    assert kv_budget_bytes(total=80 * GIB, used=10 * GIB, activation_peak=2 * GIB, utilization=0.9) == 60 * GIB
    assert kv_budget_bytes(total=100, used=95, activation_peak=10, utilization=1.0) == -5


def test_off_cuda_the_cache_takes_one_gib() -> None:
    budget = size_kv_cache(None, torch.device("cpu"), 0.9, 2048, 256)  # type: ignore[arg-type]
    assert budget.bytes == CPU_KV_CACHE_BYTES and "1 GiB" in budget.detail


def test_a_full_device_is_refused_with_what_to_change(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "activation_peak", lambda *a: 3 * GIB)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (4 * GIB, 24 * GIB))  # 20 GiB in use
    with pytest.raises(ValueError, match="no device memory left for the KV cache: .* raise --gpu-memory-utilization"):
        size_kv_cache(None, torch.device("cuda"), 0.9, 2048, 256)  # type: ignore[arg-type]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (20 * GIB, 24 * GIB))
    budget = size_kv_cache(None, torch.device("cuda"), 0.9, 2048, 256)  # type: ignore[arg-type]
    assert budget.bytes == int(24 * GIB * 0.9) - 4 * GIB - 3 * GIB
    assert "0.9 of 24.0 GiB, less 4.00 GiB in use" in budget.detail and "3.00 GiB activation peak" in budget.detail


def test_the_utilization_is_a_share() -> None:
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="gpu_memory_utilization must be in"):
            CacheConfig(gpu_memory_utilization=bad)
    assert CacheConfig().kv_cache_bytes is None


def test_the_profiled_step_fits_the_models_positions(tmp_path: Path) -> None:
    # 2048 tokens for a model of 512 positions: four sequences, as the scheduler would batch them (one of
    # 2048 positions would index past the rotary table, a device-side assert on CUDA).
    from transformers import LlamaConfig

    from loraplex import LLM
    from tests.helpers import TINY, save_tiny

    llm = LLM(str(save_tiny(LlamaConfig(**TINY), tmp_path / "m")), device="cpu", num_blocks=8)
    model = llm.engine.runner.model
    kv_bytes = run_prefill(model, torch.zeros(2048, dtype=torch.long), 64)
    cfg = model.config
    assert kv_bytes == cfg.num_layers * 2 * 2048 * cfg.num_kv_heads * cfg.head_dim * 4
