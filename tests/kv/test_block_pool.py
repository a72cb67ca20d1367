"""Block pool bookkeeping: reference counts, the LRU of cached-free blocks, longest-prefix lookup, and
prefix hashes rooted in the adapter identity."""

from __future__ import annotations

import pytest
import torch

from loraplex.adapters.ref import AdapterIdentity
from loraplex.kv.block_pool import BlockPool, KVCache, blocks_needed
from loraplex.kv.prefix_hash import extend_block_hashes, root_hash


def chain(tokens: list[int], adapter: AdapterIdentity | None = None, block_size: int = 2) -> list[bytes]:
    return extend_block_hashes([], lambda s, e: tokens[s:e], len(tokens) // block_size, block_size, adapter)


def test_hash_chain_depends_on_the_whole_prefix_and_the_adapter():
    a, a2 = AdapterIdentity("local", "/x/a", "h1"), AdapterIdentity("local", "/x/a", "h2")
    base = chain([1, 2, 3, 4, 5, 6])
    assert len(base) == 3 and len(set(base)) == 3
    assert chain([1, 2, 3, 4]) == base[:2]
    assert chain([9, 2, 3, 4])[1] != base[1]  # same block 1 tokens, other prefix
    assert chain([1, 2, 3, 4], a)[0] != base[0]
    assert chain([1, 2], a)[0] != chain([1, 2], a2)[0]  # a changed adapter is another adapter
    assert len({root_hash(None), root_hash(a), root_hash(a2)}) == 3
    grown = chain([1, 2, 3, 4])
    extend_block_hashes(grown, lambda s, e: [1, 2, 3, 4, 5, 6][s:e], 3, 2, None)
    assert grown == base


def test_free_cached_blocks_are_reused_then_evicted_least_recently_freed_first():
    pool = BlockPool(4)
    h = chain([1, 2, 3, 4, 5, 6])
    first = pool.allocate(3)
    for b, hb in zip(first, h, strict=True):
        pool.cache(b, hb)
    pool.free(reversed(first))  # tail first, as the scheduler frees
    assert pool.num_free == 4 and pool.num_cached_free == 3
    assert pool.lookup(h) == first
    assert pool.lookup([h[0], b"other", h[2]]) == first[:1]
    pool.share(first[:2])
    assert pool.num_free == 2 and pool.refs(first[0]) == 1
    # Two fresh blocks: the empty one first, then the least recently freed cached one (the tail).
    fresh = pool.allocate(2)
    assert first[2] in fresh and pool.lookup(h) == first[:2]
    assert pool.num_free == 0
    with pytest.raises(RuntimeError, match="asked for 1 KV blocks with 0 free"):
        pool.allocate(1)
    pool.free(fresh)
    pool.free(first[:2])
    assert pool.num_free == 4 and pool.num_cached_free == 2


def test_shared_block_stays_held_until_its_last_user_frees_it():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.cache(b, b"h")
    pool.share([b])
    assert pool.refs(b) == 2
    pool.free([b])
    assert pool.num_free == 1 and pool.num_cached_free == 0
    pool.free([b])
    assert pool.num_free == 2 and pool.num_cached_free == 1


def test_a_hash_cached_twice_keeps_its_first_block():
    pool = BlockPool(3)
    x, y = pool.allocate(2)
    pool.cache(x, b"h")
    pool.cache(y, b"h")  # computed concurrently by another request: stays private
    assert pool.lookup([b"h"]) == [x] and pool.num_cached == 1
    pool.free([x, y])
    assert pool.num_cached_free == 1 and pool.num_free == 3


def test_eviction_takes_the_least_recently_freed_cached_block_and_empty_blocks_come_back():
    pool = BlockPool(3)
    assert pool.num_blocks == 3 and pool.num_free == 3
    a, b, c = pool.allocate(3)
    pool.cache(a, b"a")
    pool.cache(b, b"b")
    pool.free([c])  # unhashed: empty again, handed out before any cached block
    pool.free([a])
    pool.free([b])  # a was freed before b: a is evicted first
    assert pool.allocate(1) == [c]
    assert pool.allocate(1) == [a]
    assert pool.lookup([b"a"]) == [] and pool.lookup([b"b"]) == [b] and pool.num_cached == 1
    assert pool.allocate(1) == [b] and pool.num_cached == 0


def test_a_block_that_is_not_held_cannot_be_freed_or_cached():
    pool = BlockPool(2)
    assert [pool.refs(i) for i in range(2)] == [0, 0]
    with pytest.raises(AssertionError, match="freed more often than held"):
        pool.free([0])
    with pytest.raises(AssertionError, match="is not held"):
        pool.cache(1, b"h")
    (b,) = pool.allocate(1)
    assert pool.refs(b) == 1
    pool.free([b])
    with pytest.raises(AssertionError, match="freed more often than held"):
        pool.free([b])


def test_blocks_needed_and_kv_cache_shape():
    assert [blocks_needed(n, 16) for n in (0, 1, 16, 17, 32)] == [0, 1, 1, 2, 2]
    cache = KVCache(num_layers=2, num_blocks=3, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.float16,
                    device=torch.device("cpu"))
    k, v = cache.layer(1)
    assert k.shape == v.shape == (3, 4, 2, 8) and cache.block_size == 4
    k[0, 0, 0, 0] = 1.0
    assert cache.data[1, 0, 0, 0, 0, 0] == 1.0 and cache.data[1, 1].abs().sum() == 0
    assert KVCache.bytes_per_block(2, 4, 2, 8, torch.float16) == 2 * 2 * 4 * 2 * 8 * 2
