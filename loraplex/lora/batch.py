"""Per-step LoRA batch metadata: which adapter slot each token uses, as segments the ops consume.

The runner builds one `LoRABatch` per forward step from the slot of each token's request and puts it
in the forward context; every LoRA op reads it. Tokens need not be grouped by slot: segments are
maximal runs of consecutive tokens sharing a slot, so a grouped batch gives one segment per adapter
and an interleaved one gives more, but both are correct.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from loraplex.device import to_device

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
    segmented: bool = True
    """False for a CUDA graph's batch (`unsegmented`): only `token_slots` is meaningful, the segment fields
    are empty, and only ops that read each token's slot (the triton backend's gather kernels) may run it."""

    @property
    def num_tokens(self) -> int:
        return int(self.token_slots.shape[0])

    @classmethod
    def from_token_slots(cls, token_slots: list[int], device: torch.device | str) -> LoRABatch:
        """Segment `token_slots` (one slot per token, EMPTY_SLOT for none) into runs of equal slots."""
        slots_np = np.asarray(token_slots, dtype=np.int64)  # [num_tokens]
        if slots_np.size and slots_np.min() < EMPTY_SLOT:
            raise ValueError(f"token slot must be >= {EMPTY_SLOT}, got {int(slots_np.min())}")
        # Runs start where the slot changes; the empty slot's runs are no segments.
        run_starts = np.flatnonzero(np.diff(slots_np, prepend=EMPTY_SLOT - 1))  # [num_runs]
        run_lens = np.diff(run_starts, append=slots_np.size)
        run_slots = slots_np[run_starts]
        keep = run_slots != EMPTY_SLOT
        starts, lens, slots = run_starts[keep], run_lens[keep], run_slots[keep]
        active = np.unique(slots)

        def as_tensor(values: np.ndarray) -> torch.Tensor:
            return to_device(torch.from_numpy(values.astype(np.int64, copy=False)), device)

        return cls(
            token_slots=as_tensor(slots_np),
            seg_starts=as_tensor(starts),
            seg_lens=as_tensor(lens),
            seg_slots=as_tensor(slots),
            active_slots=as_tensor(active),
            seg_starts_list=starts.tolist(),
            seg_lens_list=lens.tolist(),
            seg_slots_list=slots.tolist(),
            active_slots_list=active.tolist(),
            has_lora=bool(slots.size),
        )

    @classmethod
    def unsegmented(cls, token_slots: torch.Tensor) -> LoRABatch:
        """A batch over a device tensor of token slots whose values change after it is built (a CUDA
        graph's static input): no host copy, no segments, and `has_lora` assumed."""
        none = token_slots.new_zeros(0)
        return cls(token_slots=token_slots, seg_starts=none, seg_lens=none, seg_slots=none, active_slots=none,
                   seg_starts_list=[], seg_lens_list=[], seg_slots_list=[], active_slots_list=[], has_lora=True,
                   segmented=False)
