"""Prefix caching on a real tiny model with real LoRA adapters: KV is shared only between requests of the
same adapter (and the base model only with itself), never across adapters or a changed adapter, and
outputs are the same with the cache on and off, preemption and eviction included."""

from __future__ import annotations

import random
import shutil

import pytest
from peft import LoraConfig

from loraplex import LLM, SamplingParams
from tests.lora.peft_fixtures import make_adapter

GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
PROMPT = [(7 * i) % 500 + 1 for i in range(18)]  # 4 full blocks of 4 tokens + 2



@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    # k/v projections adapted: each adapter's keys and values differ from the base model's.
    configs = [LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj"]),
               LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj", "o_proj"]),
               LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])]
    return [str(make_adapter(base, root / f"a{i}", c, seed=10 + i)) for i, c in enumerate(configs)]


def make_llm(base, caching: bool, **options) -> LLM:
    options = {"num_blocks": 256, "block_size": 4, "max_loras": 2, "max_lora_rank": 8} | options
    return LLM(str(base), enable_prefix_caching=caching, **options)


def test_prefix_is_reused_only_under_the_same_adapter(base, adapters):
    llm, plain = make_llm(base, True), make_llm(base, False)
    sched = llm.engine.scheduler
    a, b = adapters[0], adapters[1]
    runs = [(a, 0), (b, 0), (a, 16), (None, 0), (None, 16), (b, 16)]  # (adapter, tokens expected from cache)
    for adapter, expected_hits in runs:
        hits = sched.prefix_cache_hits
        out = llm.generate([PROMPT], GREEDY, adapter_id=adapter)[0]
        assert sched.prefix_cache_hits - hits == expected_hits, adapter
        assert out.token_ids == plain.generate([PROMPT], GREEDY, adapter_id=adapter)[0].token_ids, adapter
    outs = {adapter: plain.generate([PROMPT], GREEDY, adapter_id=adapter)[0].token_ids for adapter in (a, b, None)}
    assert len({tuple(t) for t in outs.values()}) == 3  # the adapters do change the output: reuse would show
    pool = llm.engine.pool
    assert pool.num_free == pool.num_blocks and pool.num_cached_free > 0
    assert plain.engine.scheduler.prefix_cache_hits == 0 and plain.engine.pool.num_cached == 0


def test_adapter_changed_on_disk_does_not_reuse_its_old_kv(base, adapters, tmp_path):
    path = tmp_path / "mutable"
    shutil.copytree(adapters[0], path)
    llm = make_llm(base, True)
    sched = llm.engine.scheduler
    before = llm.generate([PROMPT], GREEDY, adapter_id=str(path))[0]
    shutil.rmtree(path)
    shutil.copytree(adapters[2], path)  # same name, other weights
    hits = sched.prefix_cache_hits
    after = llm.generate([PROMPT], GREEDY, adapter_id=str(path))[0]
    assert sched.prefix_cache_hits == hits
    assert after.token_ids == make_llm(base, False).generate([PROMPT], GREEDY, adapter_id=adapters[2])[0].token_ids
    assert after.token_ids != before.token_ids


def _workload(adapters: list[str], seed: int) -> list[tuple[list[int], SamplingParams, str | None]]:
    """Requests sharing a few system-prompt-like prefixes across base and adapters, greedy and seeded."""
    rng = random.Random(seed)
    stems = [[rng.randrange(1, 512) for _ in range(rng.randrange(6, 30))] for _ in range(3)]
    reqs = []
    for i in range(24):
        prompt = rng.choice(stems) + [rng.randrange(1, 512) for _ in range(rng.randrange(0, 12))]
        if not prompt:
            prompt = [1]
        if i % 2:
            params = SamplingParams(max_new_tokens=rng.randrange(1, 24), temperature=0.9, top_k=40, seed=100 + i,
                                    ignore_eos=True)
        else:
            params = SamplingParams(max_new_tokens=rng.randrange(1, 24), temperature=0.0, ignore_eos=True)
        reqs.append((prompt, params, rng.choice([None, *adapters])))
    return reqs


def _staggered(llm: LLM, reqs: list[tuple[list[int], SamplingParams, str | None]]) -> dict[str, list[int]]:
    engine, done, pending = llm.engine, {}, list(enumerate(reqs))
    rng = random.Random(3)
    while pending or engine.has_unfinished():
        for _ in range(rng.randrange(0, 4)):
            if pending:
                i, (prompt, params, adapter) = pending.pop(0)
                engine.add_request(f"r{i}", prompt, params, adapter_id=adapter)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
    return done


def test_mixed_workload_same_outputs_with_cache_on_and_off(base, adapters):
    reqs = _workload(adapters, seed=1)
    expected = _staggered(make_llm(base, False, max_num_batched_tokens=32), reqs)
    cached = make_llm(base, True, max_num_batched_tokens=32)
    assert _staggered(cached, reqs) == expected
    assert cached.engine.scheduler.prefix_cache_hits > 0
    # A pool too small for the workload: eviction of cached blocks and preemption, same outputs.
    tight = make_llm(base, True, num_blocks=24, max_num_batched_tokens=32)
    assert _staggered(tight, reqs) == expected
    assert tight.engine.scheduler.num_preemptions > 0
    pool = tight.engine.pool
    assert pool.num_free == pool.num_blocks and tight.engine.lora.slot_refs() == [0, 0]
