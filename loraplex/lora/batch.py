"""Per-step LoRA batch metadata: which adapter slot each token uses, as segments the ops consume.

The runner builds one `LoRABatch` per forward step from the slot of each token's request and puts it
in the forward context; every LoRA op reads it. Tokens need not be grouped by slot: segments are
maximal runs of consecutive tokens sharing a slot, so a grouped batch gives one segment per adapter
and an interleaved one gives more, but both are correct.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EMPTY_SLOT = -1
"""Slot of a token that uses no adapter; such tokens get no LoRA delta and cost nothing."""


@dataclass(frozen=True)
class LoRABatch:
    """Slot assignment of one step's tokens, on the device and as Python lists for host-side loops."""

    token_slots: torch.Tensor  # [num_tokens] long, EMPTY_SLOT = no adapter
    seg_starts: torch.Tensor  # [num_segments] long, first token of each non-empty-slot run
    seg_lens: torch.Tensor  # [num_segments] long, tokens in each run
    seg_slots: torch.Tensor  # [num_segments] long, slot of each run (never EMPTY_SLOT)
    active_slots: torch.Tensor  # [num_active] long, sorted distinct slots >= 0
    seg_starts_list: list[int]  # host copy of seg_starts
    seg_lens_list: list[int]  # host copy of seg_lens
    seg_slots_list: list[int]  # host copy of seg_slots
    active_slots_list: list[int]  # host copy of active_slots
    has_lora: bool  # any token has a slot >= 0

    @property
    def num_tokens(self) -> int:
        return int(self.token_slots.shape[0])

    @classmethod
    def from_token_slots(cls, token_slots: list[int], device: torch.device | str) -> LoRABatch:
        """Segment `token_slots` (one slot per token, EMPTY_SLOT for none) into runs of equal slots."""
        for slot in token_slots:
            if slot < EMPTY_SLOT:
                raise ValueError(f"token slot must be >= {EMPTY_SLOT}, got {slot}")
        starts: list[int] = []
        lens: list[int] = []
        slots: list[int] = []
        run_start = 0
        for i in range(1, len(token_slots) + 1):
            if i == len(token_slots) or token_slots[i] != token_slots[run_start]:
                if token_slots[run_start] != EMPTY_SLOT:
                    starts.append(run_start)
                    lens.append(i - run_start)
                    slots.append(token_slots[run_start])
                run_start = i
        active = sorted(set(slots))

        def as_tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        return cls(
            token_slots=as_tensor(token_slots),
            seg_starts=as_tensor(starts),
            seg_lens=as_tensor(lens),
            seg_slots=as_tensor(slots),
            active_slots=as_tensor(active),
            seg_starts_list=starts,
            seg_lens_list=lens,
            seg_slots_list=slots,
            active_slots_list=active,
            has_lora=bool(slots),
        )
