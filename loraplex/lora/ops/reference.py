"""Pure-torch reference for the LoRA delta op: the semantics every fast backend must match."""

from __future__ import annotations

import torch

from loraplex.lora.batch import EMPTY_SLOT, LoRABatch


def add_lora_reference(
    out: torch.Tensor,  # [num_tokens, out_features], updated in place
    x: torch.Tensor,  # [num_tokens, in_features]
    a: torch.Tensor,  # [num_slots, r_max, in_features]
    b: torch.Tensor,  # [num_slots, out_features, r_max]
    ranks: torch.Tensor,  # [num_slots] long
    scales: torch.Tensor,  # [num_slots] float
    batch: LoRABatch,
) -> torch.Tensor:
    """Add each token's LoRA delta to `out` in place and return `out`.

    Semantics, as a loop::

        for t in range(num_tokens):
            s = batch.token_slots[t]
            if s >= 0:
                r = ranks[s]
                out[t] += scales[s] * (x[t] @ a[s, :r].T) @ b[s, :, :r].T

    Rows of tokens with slot EMPTY_SLOT are left untouched, and a slot's A rows and B columns
    beyond its rank are never read (they may hold anything).
    """
    slots = batch.token_slots.tolist()
    for t, s in enumerate(slots):
        if s == EMPTY_SLOT:
            continue
        r = int(ranks[s])
        out[t] += scales[s] * (x[t] @ a[s, :r].T) @ b[s, :, :r].T
    return out
