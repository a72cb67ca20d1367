"""Fast pure-torch LoRA delta op (the CPU backend); same contract as `add_lora_reference`.

Two strategies, both free of per-token Python:

- segments: one pair of matmuls per run of equal-slot tokens, each sliced to the slot's own rank,
  so mixed ranks never pay for r_max and EMPTY_SLOT runs are never touched.
- sorted: adapter tokens gathered by slot (stable argsort, so any token order works), then the
  segment loop over one contiguous block per active slot, then one scatter-add back.

`add_lora` uses segments when the batch is already grouped by slot (one run per active slot: no
gather to pay for) and sorted otherwise. A padded bmm over the active slots' gathered A/B lost to
both everywhere on CPU (2-40x slower: the gather and masking move as much memory as the adapters
hold), and one over all slots padded to the largest rank slowed the 8-adapter benchmark from 0.64x
to 0.54x of base-only; see docs/benchmarks.md.
"""

from __future__ import annotations

import torch

from loraplex.lora.batch import LoRABatch


def add_lora_segments(
    out: torch.Tensor,  # [num_tokens, out_features], updated in place
    x: torch.Tensor,  # [num_tokens, in_features]
    a: torch.Tensor,  # [num_slots, r_max, in_features]
    b: torch.Tensor,  # [num_slots, r_max, out_features]
    ranks: torch.Tensor,  # [num_slots] long
    scales: torch.Tensor,  # [num_slots] float
    batch: LoRABatch,
    blocks: torch.Tensor | None = None,  # [num_slots, num_blocks, 4]; ignored
) -> torch.Tensor:
    """Segment loop: `out[seg] += scale * (x[seg] @ a[s, :r].T) @ b[s, :r]` per segment."""
    if not batch.has_lora:
        return out
    assert batch.segmented, "this LoRA op reads segments; a CUDA graph's batch has none"
    ranks_list = ranks.tolist()
    scales_list = scales.tolist()
    for start, length, slot in zip(
        batch.seg_starts_list, batch.seg_lens_list, batch.seg_slots_list, strict=True
    ):
        rows = slice(start, start + length)
        add_segment(out[rows], x[rows], a, b, slot, ranks_list[slot], scales_list[slot])
    return out


def add_lora_sorted(
    out: torch.Tensor,  # [num_tokens, out_features], updated in place
    x: torch.Tensor,  # [num_tokens, in_features]
    a: torch.Tensor,  # [num_slots, r_max, in_features]
    b: torch.Tensor,  # [num_slots, r_max, out_features]
    ranks: torch.Tensor,  # [num_slots] long
    scales: torch.Tensor,  # [num_slots] float
    batch: LoRABatch,
    blocks: torch.Tensor | None = None,  # [num_slots, num_blocks, 4]; ignored
) -> torch.Tensor:
    """Sort adapter tokens by slot, one rank-sliced matmul pair per active slot, scatter-add back."""
    if not batch.has_lora:
        return out
    assert batch.segmented, "this LoRA op reads segments; a CUDA graph's batch has none"
    counts = _tokens_per_active_slot(batch)
    num_lora_tokens = sum(counts)
    order = _adapter_tokens_by_slot(batch, num_lora_tokens)
    x_sorted = x[order]  # [num_lora_tokens, in]
    delta = out.new_zeros(num_lora_tokens, out.shape[1])  # [num_lora_tokens, out]
    ranks_list = ranks.tolist()
    scales_list = scales.tolist()
    start = 0
    for slot, length in zip(batch.active_slots_list, counts, strict=True):
        rows = slice(start, start + length)
        add_segment(delta[rows], x_sorted[rows], a, b, slot, ranks_list[slot], scales_list[slot])
        start += length
    out.index_add_(0, order, delta)
    return out


def add_segment(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slot: int, rank: int,
                  scale: float) -> None:
    """out [rows, out_features] += scale * (x @ a[slot, :rank].T) @ b[slot, :rank], in place."""
    # A zero delta leaves out unchanged, so its two matmuls are skipped.
    if rank == 0 or scale == 0.0:
        return
    # Weights stored in another dtype (`--lora-dtype`) are widened to the activations' for the products.
    hidden = x @ a[slot, :rank].to(x.dtype).T  # [rows, rank]
    out.addmm_(hidden, b[slot, :rank].to(out.dtype), alpha=scale)


def _tokens_per_active_slot(batch: LoRABatch) -> list[int]:
    counts = dict.fromkeys(batch.active_slots_list, 0)
    for length, slot in zip(batch.seg_lens_list, batch.seg_slots_list, strict=True):
        counts[slot] += length
    return [counts[s] for s in batch.active_slots_list]


def _adapter_tokens_by_slot(batch: LoRABatch, num_lora_tokens: int) -> torch.Tensor:
    """Indices of the adapter tokens, grouped by slot in ascending order, stable within a slot."""
    # EMPTY_SLOT (-1) sorts first, so the adapter tokens are the tail of a stable argsort.
    return torch.argsort(batch.token_slots, stable=True)[batch.num_tokens - num_lora_tokens :]


def _is_grouped(batch: LoRABatch) -> bool:
    """Whether each active slot's tokens are already one contiguous run (what the runner produces)."""
    return len(batch.seg_slots_list) == len(batch.active_slots_list)


def add_lora(
    out: torch.Tensor,  # [num_tokens, out_features], updated in place
    x: torch.Tensor,  # [num_tokens, in_features]
    a: torch.Tensor,  # [num_slots, r_max, in_features]
    b: torch.Tensor,  # [num_slots, r_max, out_features]
    ranks: torch.Tensor,  # [num_slots] long
    scales: torch.Tensor,  # [num_slots] float
    batch: LoRABatch,
    blocks: torch.Tensor | None = None,  # [num_slots, num_blocks, 4]; ignored
) -> torch.Tensor:
    """Add each token's LoRA delta to `out` in place and return it; semantics of `add_lora_reference`."""
    if not batch.has_lora:
        return out
    assert batch.segmented, "this LoRA op reads segments; a CUDA graph's batch has none"
    if _is_grouped(batch):
        return add_lora_segments(out, x, a, b, ranks, scales, batch)
    return add_lora_sorted(out, x, a, b, ranks, scales, batch)
