"""Content hashes of full KV blocks: a chain over the tokens, rooted in the adapter that computed them.

Block i's hash covers every token of blocks 0..i (each hash folds in its parent), so two sequences
share block i only if they share the whole prefix up to it. The chain starts from the adapter's
identity (path and content hash; a fixed root for the base model): keys and values computed under one
adapter are never served to another, nor to a changed version of the same adapter.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loraplex.adapters.ref import AdapterIdentity

BlockHash = bytes


def root_hash(adapter: AdapterIdentity | None) -> BlockHash:
    """The chain's start for KV computed under `adapter` (None: the base model)."""
    identity = b"base" if adapter is None else f"lora\0{adapter.source}\0{adapter.id}\0{adapter.version}".encode()
    return hashlib.sha256(b"loraplex-kv-prefix\0" + identity).digest()


def extend_block_hashes(hashes: list[BlockHash], tokens: Callable[[int, int], list[int]], num_blocks: int,
                        block_size: int, adapter: AdapterIdentity | None) -> list[BlockHash]:
    """Grow `hashes` (the chain of the first len(hashes) blocks) in place to `num_blocks` entries.

    `tokens(start, end)` returns the sequence's tokens [start, end), all of which must be known.
    """
    parent = hashes[-1] if hashes else root_hash(adapter)
    for i in range(len(hashes), num_blocks):
        block = array("q", tokens(i * block_size, (i + 1) * block_size))
        parent = hashlib.sha256(parent + block.tobytes()).digest()
        hashes.append(parent)
    return hashes
