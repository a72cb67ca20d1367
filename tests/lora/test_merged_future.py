"""merged_future: the merge's Future settles whatever its parts do, never hangs."""

from __future__ import annotations

from concurrent.futures import Future

import pytest

from loraplex.adapters.loader import LoadedAdapter
from loraplex.lora.adapter import AdapterNotFound
from loraplex.lora.merge import MergeSpec, merged_future


@pytest.mark.parametrize("error", [AdapterNotFound("adapter local:b: not found"), ValueError("embedded null byte"),
                                   OSError(36, "File name too long")])
def test_a_failed_part_fails_the_merge(error: Exception) -> None:
    parts: list[Future[LoadedAdapter]] = [Future(), Future()]
    merged = merged_future(MergeSpec(("a", "b"), (0.5, 0.5)), parts, max_rank=16, prepare=lambda w: w)
    parts[1].set_exception(AdapterNotFound("adapter local:b: not found"))
    assert not merged.done()  # still waiting for part a
    parts[0].set_exception(error)
    assert merged.done()  # settled at once, not left pending
    assert merged.exception() is error
