"""F12 on a real (tiny) engine: 9 adapters of ranks 4-64 through 2 active slots, 16 requests of 32 tokens
at once, steps slower than the cycle time. Every request finishes with the tokens of an unconstrained
run, no step is empty once the adapters have loaded, and slots pass on at most once per half cycle."""

from __future__ import annotations

import random

import pytest
from peft import LoraConfig

from loraplex import LLM, SamplingParams
from tests.lora.peft_fixtures import make_adapter

RANKS = [4, 8, 12, 16, 24, 32, 40, 48, 64]



@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [str(make_adapter(base, root / f"r{rank}", LoraConfig(r=rank, lora_alpha=2 * rank,
                                                               target_modules=["q_proj", "v_proj"]), seed=i))
            for i, rank in enumerate(RANKS)]


@pytest.mark.parametrize("new_tokens, cycle", [
    (12, 4),  # the default suite's cut-down run
    pytest.param(32, 16, marks=pytest.mark.slow),  # as reported, with the default cycle
])
def test_sixteen_requests_over_nine_adapters_on_two_slots_all_finish(base, adapters, new_tokens, cycle):
    # A 1 ms cycle time: every step of this engine is slower than that, as the demo model's steps on a
    # small CPU are slower than the default 2 s (F12).
    llm = LLM(str(base), num_blocks=512, block_size=4, max_loras=4, max_lora_rank=64, max_active_adapters=2,
              adapter_cycle_steps=cycle, adapter_cycle_time_s=1e-3)
    engine = llm.engine
    rng = random.Random(0)
    prompts = [[rng.randrange(1, 512) for _ in range(rng.randrange(4, 24))] for _ in range(16)]
    ids = [adapters[i % 9] for i in range(16)]
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for i, (prompt, adapter) in enumerate(zip(prompts, ids, strict=True)):
        engine.add_request(f"r{i}", prompt, params, adapter_id=adapter)
    engine.wait_for_adapter_loads(timeout=120)
    done: dict[str, list[int]] = {}
    steps = 0
    while engine.has_unfinished():
        outputs = engine.step()
        steps += 1
        # (with async output a step's outputs are the last step's, and the last step only reports)
        assert engine.last_step_rows or outputs, f"step {steps} ran no request"
        done.update({o.request_id: o.token_ids for o in outputs if o.finished})
        assert steps < 400, "the engine stopped making progress"
    assert len(done) == 16 and all(len(t) == new_tokens for t in done.values())
    # Parking every holder at every step (as main did: 197 parks in 148 steps as reported) costs a slot
    # load per park and shrinks each step's batch; a slot now passes on at most once per half cycle.
    sched = engine.scheduler
    assert sched.num_parks <= 2 * steps // (cycle // 2), (sched.num_parks, steps)
    roomy = LLM(str(base), num_blocks=512, block_size=4, max_loras=9, max_lora_rank=64)
    expected = roomy.generate(prompts, params, adapter_id=ids)
    assert [done[f"r{i}"] for i in range(16)] == [o.token_ids for o in expected]
