"""Sampler rows for tests: what the engine's `Sequence` gives the sampler (params, seed, prompt, output)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from loraplex.engine.request import SamplingParams


@dataclass(eq=False)
class Row:
    params: SamplingParams
    seed: int = 0
    prompt_token_ids: list[int] = field(default_factory=lambda: [1])
    output_token_ids: list[int] = field(default_factory=list)


def rows(params: Sequence[SamplingParams], seeds: Sequence[int] | None = None,
         prompts: Sequence[list[int]] | None = None, outputs: Sequence[list[int]] | None = None) -> list[Row]:
    """One row per params: seed i, prompt [1] and an empty output unless given."""
    n = len(params)
    return [Row(p, (seeds or range(n))[i], list((prompts or [[1]] * n)[i]), list((outputs or [[]] * n)[i]))
            for i, p in enumerate(params)]
