"""Pure-torch reference for the LoRA delta op: the semantics every fast backend must match."""

from __future__ import annotations

import torch

from loraplex.lora.batch import EMPTY_SLOT, LoRABatch


def add_lora_reference(
    out: torch.Tensor,  # [num_tokens, out_features], updated in place
    x: torch.Tensor,  # [num_tokens, in_features]
    a: torch.Tensor,  # [num_slots, r_max, in_features]
    b: torch.Tensor,  # [num_slots, r_max, out_features]
    ranks: torch.Tensor,  # [num_slots] long
    scales: torch.Tensor,  # [num_slots] float
    batch: LoRABatch,
    blocks: torch.Tensor | None = None,  # [num_slots, num_blocks, 4] long, a hint (see below)
) -> torch.Tensor:
    """Add each token's LoRA delta to `out` in place and return `out`.

    Semantics, as a loop::

        for t in range(num_tokens):
            s = batch.token_slots[t]
            if s >= 0:
                r = ranks[s]
                out[t] += scales[s] * (x[t] @ a[s, :r].T) @ b[s, :r]

    A and B may be stored in another dtype than x (`--lora-dtype`): they are widened to x's for the products.
    Rows of tokens with slot EMPTY_SLOT are left untouched, and a slot's A and B rows beyond its
    rank are never read (they may hold anything).

    `blocks`, when given, promises that `b[s]` is zero outside its blocks `blocks[s, i] = (rank row
    start, rank rows, output column start, output columns)` (a packed q|k|v layer's B is block-
    diagonal). An op may skip the zeros; the result is the same, so this reference ignores it.
    """
    slots = batch.token_slots.tolist()
    for t, s in enumerate(slots):
        if s == EMPTY_SLOT:
            continue
        r = int(ranks[s])
        out[t] += scales[s] * (x[t] @ a[s, :r].to(x.dtype).T) @ b[s, :r].to(x.dtype)
    return out
