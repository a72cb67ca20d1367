"""LoRABatch segments: the vectorised segmentation against the plain loop over tokens it replaced."""

from __future__ import annotations

import random

import pytest

from loraplex.lora.batch import EMPTY_SLOT, LoRABatch


def _segments_by_loop(slots: list[int]) -> tuple[list[int], list[int], list[int], list[int]]:
    starts: list[int] = []
    lens: list[int] = []
    seg_slots: list[int] = []
    run_start = 0
    for i in range(1, len(slots) + 1):
        if i == len(slots) or slots[i] != slots[run_start]:
            if slots[run_start] != EMPTY_SLOT:
                starts.append(run_start)
                lens.append(i - run_start)
                seg_slots.append(slots[run_start])
            run_start = i
    return starts, lens, seg_slots, sorted(set(seg_slots))


@pytest.mark.parametrize("seed", range(4))
def test_segments_equal_the_loop_over_tokens(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(500):
        slots = [rng.choice([EMPTY_SLOT, EMPTY_SLOT, 0, 1, 2, 7]) for _ in range(rng.randrange(0, 24))]
        batch = LoRABatch.from_token_slots(slots, "cpu")
        got = (batch.seg_starts_list, batch.seg_lens_list, batch.seg_slots_list, batch.active_slots_list)
        assert got == _segments_by_loop(slots), slots
        assert batch.token_slots.tolist() == slots
        assert [batch.seg_starts.tolist(), batch.seg_lens.tolist(), batch.seg_slots.tolist(),
                batch.active_slots.tolist()] == list(got)
        assert batch.has_lora == bool(got[2]) and batch.num_tokens == len(slots)


def test_a_slot_below_empty_is_refused() -> None:
    with pytest.raises(ValueError, match="-2"):
        LoRABatch.from_token_slots([0, -2, 1], "cpu")
