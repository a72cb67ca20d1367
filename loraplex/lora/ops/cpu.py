"""Fast pure-torch LoRA delta op (the CPU backend); same contract as `add_lora_reference`.

Three strategies, all free of per-token Python:

- segments: one pair of matmuls per run of equal-slot tokens, each sliced to the slot's own rank,
  so mixed ranks never pay for r_max and EMPTY_SLOT runs are never touched.
- sorted: adapter tokens gathered by slot (stable argsort, so any token order works), then the
  segment loop over one contiguous block per active slot, then one scatter-add back.
- grouped: the sorted tokens padded to the largest group, one bmm pair over the active slots'
  A/B gathered and sliced to their largest rank, then scattered back.

`add_lora` uses segments when the batch is already grouped by slot (one run per active slot: no
gather to pay for) and sorted otherwise. grouped loses everywhere on CPU: gathering and masking the
active slots' A/B every call is memory traffic of the size of the adapters themselves, several times
the matmul work at these ranks (scripts/bench_lora_ops.py prints the timings). It is kept as the
shape a batched GPU kernel takes, and tested against the reference like the others.
"""

from __future__ import annotations

import torch

from loraplex.lora.batch import LoRABatch


def add_lora_segments(
    out: torch.Tensor,  # [num_tokens, out_features], updated in place
    x: torch.Tensor,  # [num_tokens, in_features]
    a: torch.Tensor,  # [num_slots, r_max, in_features]
    b: torch.Tensor,  # [num_slots, out_features, r_max]
    ranks: torch.Tensor,  # [num_slots] long
    scales: torch.Tensor,  # [num_slots] float
    batch: LoRABatch,
) -> torch.Tensor:
    """Segment loop: `out[seg] += scale * (x[seg] @ a[s, :r].T) @ b[s, :, :r].T` per segment."""
    if not batch.has_lora:
        return out
    ranks_list = ranks.tolist()
    scales_list = scales.tolist()
    for start, length, slot in zip(
        batch.seg_starts_list, batch.seg_lens_list, batch.seg_slots_list, strict=True
    ):
        rows = slice(start, start + length)
        _add_one_slot(out[rows], x[rows], a, b, slot, ranks_list[slot], scales_list[slot])
    return out


def add_lora_grouped(
    out: torch.Tensor,  # [num_tokens, out_features], updated in place
    x: torch.Tensor,  # [num_tokens, in_features]
    a: torch.Tensor,  # [num_slots, r_max, in_features]
    b: torch.Tensor,  # [num_slots, out_features, r_max]
    ranks: torch.Tensor,  # [num_slots] long
    scales: torch.Tensor,  # [num_slots] float
    batch: LoRABatch,
) -> torch.Tensor:
    """Group tokens by slot, pad to the largest group, one bmm pair over the active slots."""
    if not batch.has_lora:
        return out
    active = batch.active_slots  # [num_active]
    active_list = batch.active_slots_list
    counts_list = _tokens_per_active_slot(batch)
    num_lora_tokens = sum(counts_list)
    max_count = max(counts_list)
    active_ranks = ranks[active]  # [num_active]
    max_rank = int(active_ranks.max())
    if max_rank == 0:
        return out

    order = _adapter_tokens_by_slot(batch, num_lora_tokens)
    sorted_slots = batch.token_slots[order]  # [num_lora_tokens]
    group = torch.searchsorted(active, sorted_slots)  # [num_lora_tokens] index into active
    counts_t = torch.tensor(counts_list, dtype=torch.long, device=x.device)  # [num_active]
    group_starts = torch.cumsum(counts_t, 0) - counts_t  # [num_active]
    position = torch.arange(num_lora_tokens, device=x.device) - group_starts[group]  # [num_lora_tokens]

    x_grouped = x.new_zeros(len(active_list), max_count, x.shape[1])  # [num_active, max_count, in]
    x_grouped[group, position] = x[order]
    # Rows/columns past each slot's rank may hold anything (even NaN), so mask with where, not *0.
    in_rank = torch.arange(max_rank, device=x.device) < active_ranks[:, None]  # [num_active, max_rank]
    # Indexing with a tensor copies, so masking in place never touches the slot buffers.
    a_active = a[active, :max_rank].masked_fill_(~in_rank[:, :, None], 0)  # [num_active, max_rank, in]
    b_active = b[active, :, :max_rank].masked_fill_(~in_rank[:, None, :], 0)  # [num_active, out, max_rank]
    hidden = torch.bmm(x_grouped, a_active.transpose(1, 2))  # [num_active, max_count, max_rank]
    hidden.mul_(scales[active].to(hidden.dtype)[:, None, None])
    delta = torch.bmm(hidden, b_active.transpose(1, 2))  # [num_active, max_count, out]
    out.index_add_(0, order, delta[group, position])
    return out


def add_lora_sorted(
    out: torch.Tensor,  # [num_tokens, out_features], updated in place
    x: torch.Tensor,  # [num_tokens, in_features]
    a: torch.Tensor,  # [num_slots, r_max, in_features]
    b: torch.Tensor,  # [num_slots, out_features, r_max]
    ranks: torch.Tensor,  # [num_slots] long
    scales: torch.Tensor,  # [num_slots] float
    batch: LoRABatch,
) -> torch.Tensor:
    """Sort adapter tokens by slot, one rank-sliced matmul pair per active slot, scatter-add back."""
    if not batch.has_lora:
        return out
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
        _add_one_slot(delta[rows], x_sorted[rows], a, b, slot, ranks_list[slot], scales_list[slot])
        start += length
    out.index_add_(0, order, delta)
    return out


def _add_one_slot(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slot: int, rank: int,
                  scale: float) -> None:
    """out [rows, out_features] += scale * (x @ a[slot, :rank].T) @ b[slot, :, :rank].T, in place."""
    # A zero delta leaves out unchanged, so its two matmuls are skipped.
    if rank == 0 or scale == 0.0:
        return
    hidden = x @ a[slot, :rank].T  # [rows, rank]
    out.addmm_(hidden, b[slot, :, :rank].T, alpha=scale)


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
    b: torch.Tensor,  # [num_slots, out_features, r_max]
    ranks: torch.Tensor,  # [num_slots] long
    scales: torch.Tensor,  # [num_slots] float
    batch: LoRABatch,
) -> torch.Tensor:
    """Add each token's LoRA delta to `out` in place and return it; semantics of `add_lora_reference`."""
    if not batch.has_lora:
        return out
    if _is_grouped(batch):
        return add_lora_segments(out, x, a, b, ranks, scales, batch)
    return add_lora_sorted(out, x, a, b, ranks, scales, batch)
