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

from loraplex.kv.block_pool import KVCache
from loraplex.model.attention import AttentionMetadata, PrefillChunk
from loraplex.model.context import ForwardContext, forward_context
from loraplex.model.decoder import CausalLM

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


def activation_peak(model: CausalLM, device: torch.device, tokens: int, rows: int, max_len: int) -> int:
    """Bytes a forward of a `tokens`-token prefill (sequences of at most `max_len` positions), with the LM head
    over `rows` of them, allocates at its peak beyond what is held before it (its own small KV cache
    excluded), plus the sampler's copies."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    kv_bytes = profile_forward(model, device, tokens, rows, max_len)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before - kv_bytes
    torch.cuda.empty_cache()
    return peak + SAMPLER_COPIES * rows * model.config.vocab_size * 4


def profile_forward(model: CausalLM, device: torch.device, tokens: int, rows: int, max_len: int) -> int:
    """Run the largest step: `tokens` prompt tokens as prefill chunks of at most `max_len` positions (one
    sequence each, as the scheduler would batch them), the LM head over `rows`. Returns the bytes of the
    small KV cache it allocated for them."""
    cfg = model.config
    dtype = model.model.embed_tokens.weight.dtype
    block = 16
    lengths = [min(max_len, tokens - start) for start in range(0, tokens, max_len)]
    blocks = [-(-n // block) for n in lengths]
    kv = KVCache(cfg.num_layers, sum(blocks), block, cfg.num_kv_heads, cfg.head_dim, dtype, device)
    chunks, slots, positions, first_block = [], [], [], 0
    for q_start, (n, b) in zip(range(0, tokens, max_len), zip(lengths, blocks, strict=True), strict=True):
        table = torch.arange(first_block, first_block + b, device=device)
        chunks.append(PrefillChunk(q_start, n, n, table))
        slots.append(torch.arange(n, device=device) + first_block * block)
        positions.append(torch.arange(n, device=device))
        first_block += b
    attn = AttentionMetadata(slot_mapping=torch.cat(slots), num_decode=0,
                             decode_block_tables=torch.zeros(0, 1, dtype=torch.long, device=device),
                             decode_context_lens=torch.zeros(0, dtype=torch.long, device=device), prefills=chunks)
    with torch.inference_mode(), forward_context(ForwardContext(attn=attn, kv_cache=kv)):
        hidden = model(torch.zeros(tokens, dtype=torch.long, device=device), torch.cat(positions))
        model.compute_logits(hidden[:rows])
    return kv.data.numel() * kv.data.element_size()


def size_kv_cache(model: CausalLM, device: torch.device, utilization: float, max_tokens: int,
                  max_rows: int, max_len: int) -> KVBudget:
    """The KV cache's bytes for a model loaded on `device` (see the module's docstring); ValueError when the
    device has no room left for even one block."""
    if device.type != "cuda":
        return KVBudget(CPU_KV_CACHE_BYTES, "1 GiB (the default off CUDA; --kv-cache-bytes sets it)")
    gc.collect()  # engines dropped before this one hand their memory back to the device first
    torch.cuda.empty_cache()
    peak = activation_peak(model, device, max_tokens, min(max_rows, max_tokens), max_len)
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
