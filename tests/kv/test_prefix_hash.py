"""Prefix-cache block hashes: a chain grown a block at a time is the chain computed at once."""

from __future__ import annotations

import random

from loraplex.adapters.ref import AdapterIdentity
from loraplex.kv.prefix_hash import extend_block_hashes


def test_a_chain_grown_block_by_block_equals_the_chain_computed_at_once() -> None:
    rng = random.Random(0)
    tokens = [rng.randrange(50_000) for _ in range(40)]

    def read(start: int, end: int) -> list[int]:
        return tokens[start:end]

    for adapter in (None, AdapterIdentity("local", "/adapters/a", "v1")):
        whole = extend_block_hashes([], read, 10, 4, adapter)
        grown: list[bytes] = []
        for n in (1, 2, 3, 5, 10):  # as decoding fills blocks: one, then several at a time
            extend_block_hashes(grown, read, n, 4, adapter)
        assert grown == whole and len(set(whole)) == 10
        # Each hash names the whole prefix: a different earlier block changes every later hash.
        other = extend_block_hashes([], lambda s, e: ([1] + tokens[1:])[s:e], 10, 4, adapter)
        assert all(a != b for a, b in zip(other, whole, strict=True))
    assert extend_block_hashes([], read, 3, 4, None) != extend_block_hashes(
        [], read, 3, 4, AdapterIdentity("local", "/adapters/a", "v1"))
