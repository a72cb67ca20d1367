"""The KV block pool: reference-counted blocks, and the prefix cache of full blocks kept after use.

A block is in one of three states:

    in use        held by one or more sequences (ref count > 0); shared blocks are full and never written
    cached-free   no sequence holds it, but it still holds the KV of a known prefix (it has a hash):
                  a later request with that prefix reuses it; allocation evicts the least recently freed
    empty         no sequence holds it and it holds nothing worth keeping

`num_free` counts every block no sequence holds (empty + cached-free): all of them can be allocated,
so an idle pool has `num_free == num_blocks`, with `num_cached_free` of them still reusable.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable

import torch

from loraplex.kv.prefix_hash import BlockHash


class BlockPool:
    """Hands out block ids from a fixed pool. Block contents live in `KVCache`; this only does bookkeeping."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._refs = [0] * num_blocks
        self._hash: list[BlockHash | None] = [None] * num_blocks
        self._by_hash: dict[BlockHash, int] = {}
        self._empty: deque[int] = deque(range(num_blocks))
        # Oldest-freed first: the eviction order. Sequences free their blocks tail first, so a prefix's
        # deeper blocks (useless once its head is gone) are evicted before its head.
        self._cached_free: OrderedDict[int, None] = OrderedDict()

    @property
    def num_free(self) -> int:
        """Blocks no sequence holds, cached-free ones included: all of them can be allocated."""
        return len(self._empty) + len(self._cached_free)

    @property
    def num_cached_free(self) -> int:
        """Free blocks that still hold a reusable prefix (the prefix cache's LRU)."""
        return len(self._cached_free)

    @property
    def num_cached(self) -> int:
        """Blocks with a registered prefix hash, in use or not."""
        return len(self._by_hash)

    def refs(self, block: int) -> int:
        return self._refs[block]

    def allocate(self, n: int) -> list[int]:
        """`n` fresh blocks, each held once; evicts the least recently freed cached blocks when no empty
        ones are left."""
        if n > self.num_free:
            raise RuntimeError(f"asked for {n} KV blocks with {self.num_free} free")
        blocks = []
        for _ in range(n):
            if self._empty:
                b = self._empty.popleft()
            else:
                b, _ = self._cached_free.popitem(last=False)
                h = self._hash[b]
                assert h is not None
                del self._by_hash[h]
                self._hash[b] = None
            self._refs[b] = 1
            blocks.append(b)
        return blocks

    def lookup(self, hashes: Iterable[BlockHash]) -> list[int]:
        """The blocks of the longest cached prefix of the chain `hashes` (not yet held: see `share`)."""
        hits = []
        for h in hashes:
            b = self._by_hash.get(h)
            if b is None:
                break
            hits.append(b)
        return hits

    def share(self, blocks: list[int]) -> None:
        """Hold cached blocks found by `lookup` once more (taking free ones out of the LRU)."""
        for b in blocks:
            assert self._hash[b] is not None, f"block {b} is not a cached block"
            if self._refs[b] == 0:
                del self._cached_free[b]
            self._refs[b] += 1

    def cache(self, block: int, h: BlockHash) -> None:
        """Register a full, computed, held block under its prefix hash. A hash already cached in another
        block (two requests computed the same prefix at once) keeps its block; this one stays private."""
        assert self._refs[block] > 0, f"block {block} is not held"
        if self._hash[block] is None and h not in self._by_hash:
            self._hash[block] = h
            self._by_hash[h] = block

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one hold on each block; a block nobody holds becomes cached-free (if hashed) or empty."""
        for b in blocks:
            assert self._refs[b] > 0, f"block {b} freed more often than held"
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if self._hash[b] is not None:
                    self._cached_free[b] = None
                else:
                    self._empty.append(b)


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class KVCache:
    """Key and value storage of every layer: `[num_blocks, block_size, kv_heads, head_dim]` per layer."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
        self.block_size = block_size
        self.data = torch.zeros(shape, dtype=dtype, device=device)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[index, 0], self.data[index, 1]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return num_layers * 2 * block_size * num_kv_heads * head_dim * dtype.itemsize
