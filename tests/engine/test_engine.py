"""Continuous batching: requests joining at different steps produce what they produce alone; KV is returned."""

from __future__ import annotations

import random

import pytest
from transformers import LlamaConfig

from loraplex import LLM, SamplingParams
from loraplex.engine.request import FinishReason
from tests.helpers import TINY, save_tiny


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return str(save_tiny(LlamaConfig(**TINY), tmp_path_factory.mktemp("llama")))


def _requests(seed: int, sampled: bool) -> list[tuple[list[int], SamplingParams]]:
    rng = random.Random(seed)
    reqs = []
    for i in range(16):
        prompt = [rng.randrange(1, 512) for _ in range(rng.randrange(1, 60))]
        if sampled:
            params = SamplingParams(max_new_tokens=rng.randrange(1, 40), temperature=0.9, top_k=50, top_p=0.9,
                                    seed=1000 + i, ignore_eos=True, repetition_penalty=1.1)
        else:
            params = SamplingParams(max_new_tokens=rng.randrange(1, 40), temperature=0.0, ignore_eos=True)
        reqs.append((prompt, params))
    return reqs


def _staggered(llm: LLM, reqs: list[tuple[list[int], SamplingParams]]) -> dict[str, list[int]]:
    """Add requests a few at a time between steps, as a server would, and collect the final tokens."""
    engine, done, pending = llm.engine, {}, list(enumerate(reqs))
    rng = random.Random(7)
    while pending or engine.has_unfinished():
        for _ in range(rng.randrange(0, 4)):
            if pending:
                i, (prompt, params) = pending.pop(0)
                engine.add_request(f"r{i}", prompt, params)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
    return done


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_batched_equals_solo(tiny_llama, sampled):
    reqs = _requests(3, sampled)
    # A small step budget mixes prefill chunks with decodes in the same forward pass.
    llm = LLM(tiny_llama, num_blocks=256, block_size=4, max_num_batched_tokens=48)
    batched = _staggered(llm, reqs)
    for i, (prompt, params) in enumerate(reqs):
        solo = llm.generate([prompt], params)[0]
        assert batched[f"r{i}"] == solo.token_ids, f"request {i}"
        assert len(solo.token_ids) == params.max_new_tokens
    assert llm.engine.pool.num_free == llm.engine.pool.num_blocks


def test_preemption_keeps_outputs_identical(tiny_llama):
    reqs = _requests(5, sampled=True)
    roomy = LLM(tiny_llama, num_blocks=512, block_size=4)
    expected = [o.token_ids for o in roomy.generate([p for p, _ in reqs], [s for _, s in reqs])]
    # 26 blocks of 4 tokens hold just one long request: the scheduler must preempt and recompute.
    tight = LLM(tiny_llama, num_blocks=26, block_size=4)
    got = [o.token_ids for o in tight.generate([p for p, _ in reqs], [s for _, s in reqs])]
    assert tight.engine.scheduler.num_preemptions > 0
    assert got == expected
    assert tight.engine.pool.num_free == tight.engine.pool.num_blocks


def test_abort_returns_every_block(tiny_llama):
    llm = LLM(tiny_llama, num_blocks=128, block_size=4)
    engine = llm.engine
    params = SamplingParams(max_new_tokens=30, temperature=0.0, ignore_eos=True)
    for i in range(8):
        engine.add_request(f"a{i}", list(range(1, 10 + 3 * i)), params)
    for _ in range(3):
        engine.step()
    assert engine.pool.num_free < engine.pool.num_blocks
    for i in range(0, 8, 2):
        engine.abort(f"a{i}")
    engine.abort("never-added")
    finished = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert sorted(finished) == [f"a{i}" for i in range(1, 8, 2)]
    assert all(o.finish_reason is FinishReason.LENGTH for o in finished.values())
    assert engine.pool.num_free == engine.pool.num_blocks


def test_request_validation(tiny_llama):
    llm = LLM(tiny_llama, num_blocks=16, block_size=4, max_model_len=128)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[1, 600]], SamplingParams())
    with pytest.raises(ValueError, match="at most 127"):
        llm.generate([list(range(1, 200))], SamplingParams())
    with pytest.raises(ValueError, match="do not fit the KV cache"):
        llm.generate([[1, 2, 3]], SamplingParams(max_new_tokens=100))
    assert llm.engine.pool.num_free == 16


def test_max_model_len_stops_generation(tiny_llama):
    llm = LLM(tiny_llama, num_blocks=64, block_size=4, max_model_len=20)
    out = llm.generate([list(range(1, 15))], SamplingParams(max_new_tokens=50, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 6 and out.finish_reason is FinishReason.LENGTH


def test_admission_limits_name_the_numbers(tiny_llama):
    llm = LLM(tiny_llama, num_blocks=64, block_size=4, max_input_length=10, max_total_tokens=16)
    engine = llm.engine
    with pytest.raises(ValueError, match="the prompt has 11 tokens; max_input_length is 10"):
        engine.add_request("long", list(range(1, 12)), SamplingParams(max_new_tokens=1))
    with pytest.raises(ValueError, match=r"8 \+ 9 = 17 tokens; max_total_tokens is 16"):
        engine.add_request("total", list(range(1, 9)), SamplingParams(max_new_tokens=9))
    with pytest.raises(ValueError, match="truncate must be >= 1, got 0"):
        engine.add_request("t0", [1, 2, 3], SamplingParams(), truncate=0)
    assert not engine.has_unfinished()
    # truncate keeps the last tokens: the same output as sending only those.
    params = SamplingParams(max_new_tokens=5, temperature=0.0, ignore_eos=True)
    engine.add_request("cut", list(range(1, 40)), params, truncate=10)
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert done["cut"].prompt_token_ids == list(range(30, 40))
    assert done["cut"].token_ids == llm.generate([list(range(30, 40))], params)[0].token_ids


def test_total_token_cap_rejects_what_could_never_run(tiny_llama):
    llm = LLM(tiny_llama, num_blocks=64, block_size=4, max_batch_total_tokens=20)
    with pytest.raises(ValueError, match="exceed max_batch_total_tokens \\(20\\)"):
        llm.generate([[1, 2, 3]], SamplingParams(max_new_tokens=18))


@pytest.mark.parametrize("options", [dict(max_batch_total_tokens=100), dict(max_batch_prefill_tokens=5),
                                     dict(enable_prefix_caching=False, max_num_seqs=3)],
                         ids=["total-cap", "prefill-budget", "no-cache-few-seqs"])
def test_budgets_keep_outputs_identical(tiny_llama, options):
    reqs = _requests(5, sampled=True)
    roomy = LLM(tiny_llama, num_blocks=512, block_size=4)
    expected = [o.token_ids for o in roomy.generate([p for p, _ in reqs], [s for _, s in reqs])]
    llm = LLM(tiny_llama, num_blocks=512, block_size=4, **options)
    assert [o.token_ids for o in llm.generate([p for p, _ in reqs], [s for _, s in reqs])] == expected
    assert llm.engine.pool.num_free == llm.engine.pool.num_blocks


@pytest.mark.parametrize("bad, message", [
    (dict(max_input_length=16, max_total_tokens=16), "max_input_length \\(16\\) must be < max_total_tokens \\(16\\)"),
    (dict(max_total_tokens=64, max_batch_total_tokens=32), "max_total_tokens \\(64\\) must be <= max_batch_total"),
    (dict(max_batch_prefill_tokens=0), "max_batch_prefill_tokens must be >= 1, got 0"),
    (dict(max_active_adapters=0), "max_active_adapters must be >= 1, got 0"),
    (dict(adapter_cycle_time_s=0.0), "adapter_cycle_time_s must be > 0, got 0.0"),
])
def test_scheduler_config_validation(bad, message):
    from loraplex.config import SchedulerConfig

    with pytest.raises(ValueError, match=message):
        SchedulerConfig(**bad)


def test_a_request_that_does_not_stream_reports_its_first_and_final_tokens_only(tiny_llama):
    llm = LLM(tiny_llama, num_blocks=256, block_size=4)
    engine = llm.engine
    params = SamplingParams(max_new_tokens=12, temperature=0.9, seed=5, ignore_eos=True)
    engine.add_request("every", [5, 6, 7], params)
    engine.add_request("quiet", [5, 6, 7], params, every_token=False)
    seen: dict[str, list[int]] = {"every": [], "quiet": []}
    final = {}
    rows = []
    while engine.has_unfinished():
        outputs = engine.step()
        rows.append(engine.last_step_rows)
        for out in outputs:
            seen[out.request_id].append(len(out.token_ids))
            if out.finished:
                final[out.request_id] = out
    assert seen["every"] == list(range(1, 13))
    assert seen["quiet"] == [1, 12]
    assert final["quiet"].token_ids == final["every"].token_ids and final["quiet"].text == final["every"].text
    assert final["quiet"].finish_reason is FinishReason.LENGTH
    assert rows.count(2) == 12  # both requests got a token at every step, reported or not
    engine.step()  # nothing left to run: the count must not repeat the last step's
    assert engine.last_step_rows == 0
