"""The KV cache's size when it is not given: on CUDA, what `gpu_memory_utilization` of the device leaves once
the weights, the adapter slots and a forward's peak activations are counted; 1 GiB elsewhere.

Measured, not guessed: the weights and slots are what the device holds when the cache is sized, and the
activations' peak is that of a real forward of the largest step the scheduler can build (a prefill of
`max_num_batched_tokens` tokens, its LM head over `max_num_seqs` rows) plus the sampler's working copies of
those rows' logits. CUDA graphs are captured after the cache exists, from what utilization leaves over.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass

import torch

from loraplex.model.decoder import CausalLM
from loraplex.model.prefill import run_prefill

log = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 1 << 30
SAMPLER_COPIES = 4
"""float32 [rows, vocab] tensors the sampler holds at once at most (logits, probabilities, a sort and its index)."""


@dataclass(frozen=True)
class KVBudget:
    bytes: int
    detail: str


def kv_budget_bytes(total: int, used: int, activation_peak: int, utilization: float) -> int:
    """Bytes for the KV cache: `utilization` of `total` device memory, less what is in use (the weights, the
    adapter slots, other processes, the CUDA context) and the activations' peak."""
    return int(total * utilization) - used - activation_peak


def activation_peak(model: CausalLM, device: torch.device, tokens: int, rows: int) -> int:
    """Bytes the largest step, a `tokens`-token prefill with the LM head over `rows` of them (`run_prefill`),
    allocates at its peak beyond what is held before it (its own small KV cache excluded), plus the sampler's
    copies."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    kv_bytes = run_prefill(model, torch.zeros(tokens, dtype=torch.long), rows)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before - kv_bytes
    torch.cuda.empty_cache()
    return peak + SAMPLER_COPIES * rows * model.config.vocab_size * 4


def size_kv_cache(model: CausalLM, device: torch.device, utilization: float, max_tokens: int,
                  max_rows: int) -> KVBudget:
    """The KV cache's bytes for a model loaded on `device` (see the module's docstring); ValueError when the
    device has no room left for even one block."""
    if device.type != "cuda":
        return KVBudget(CPU_KV_CACHE_BYTES, "1 GiB (the default off CUDA; --kv-cache-bytes sets it)")
    gc.collect()  # engines dropped before this one hand their memory back to the device first
    torch.cuda.empty_cache()
    peak = activation_peak(model, device, max_tokens, min(max_rows, max_tokens))
    free, total = torch.cuda.mem_get_info(device)
    used = total - free
    budget = kv_budget_bytes(total, used, peak, utilization)
    gib = 2 ** 30
    detail = (f"{budget / gib:.2f} GiB: {utilization:g} of {total / gib:.1f} GiB, less {used / gib:.2f} GiB in use "
              f"(weights, adapter slots, other processes) and a {peak / gib:.2f} GiB activation peak")
    if budget <= 0:
        raise ValueError(f"no device memory left for the KV cache: {detail}; raise --gpu-memory-utilization, lower "
                         "--max-num-batched-tokens or --max-loras, or set --kv-cache-bytes")
    return KVBudget(budget, detail)
