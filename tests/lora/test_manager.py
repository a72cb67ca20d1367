"""Slots: adapters rotate through few slots with identical outputs, in-use slots are never overwritten,
bad adapters fail only their own requests, and an adapter changed on disk is a new adapter."""

from __future__ import annotations

import random
import shutil

import pytest
from peft import LoraConfig

from loraplex import LLM, SamplingParams
from loraplex.lora import AdapterError
from tests.lora.peft_fixtures import make_adapter

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PARAMS = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)



@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    configs = [LoraConfig(r=4 + 4 * i, lora_alpha=16, target_modules=ALL if i % 2 else ["q_proj", "v_proj"])
               for i in range(5)]
    return [str(make_adapter(base, root / f"a{i}", c, seed=i)) for i, c in enumerate(configs)]


@pytest.mark.parametrize("cycle_steps", [16, 2])
def test_adapters_rotate_through_few_slots(base, adapters, cycle_steps):
    # With a 2-step cycle, slot holders are parked mid-request and resume with their adapter reloaded.
    llm = LLM(str(base), num_blocks=256, block_size=4, max_loras=2, max_lora_rank=32,
              adapter_cycle_steps=cycle_steps)
    manager = llm.engine.lora
    overwrites_in_use = []
    load = manager._load

    def checked_load(slot, key):
        overwrites_in_use.append(manager.slot_refs()[slot] != 0)
        load(slot, key)

    manager._load = checked_load
    rng = random.Random(0)
    prompts = [[rng.randrange(1, 512) for _ in range(rng.randrange(2, 20))] for _ in range(15)]
    ids = [adapters[i % 5] if i % 3 else None for i in range(15)]
    batched = llm.generate(prompts, PARAMS, adapter_id=ids)
    assert manager.loads > 2  # five adapters through two slots: they had to take turns
    if cycle_steps == 2:
        assert llm.engine.scheduler.num_parks > 0
    assert not any(overwrites_in_use)
    assert manager.slot_refs() == [0, 0]
    assert llm.engine.pool.num_free == llm.engine.pool.num_blocks
    for prompt, adapter, out in zip(prompts, ids, batched, strict=True):
        assert out.token_ids == llm.generate([prompt], PARAMS, adapter_id=adapter)[0].token_ids


def test_bad_adapter_fails_only_its_request(base, adapters, tmp_path):
    llm = LLM(str(base), num_blocks=128, block_size=4, max_loras=2, max_lora_rank=32)
    engine = llm.engine
    engine.add_request("good", [5, 6, 7], PARAMS, adapter_id=adapters[1])
    engine.add_request("bad", [5, 6, 7], PARAMS, adapter_id=str(tmp_path / "nope"))
    done, errors = {}, {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.error is not None:
                errors[o.request_id] = o.error
            elif o.finished:
                done[o.request_id] = o
    assert list(done) == ["good"] and list(errors) == ["bad"]
    assert isinstance(errors["bad"], AdapterError) and "nope" in str(errors["bad"])
    assert done["good"].token_ids == llm.generate([[5, 6, 7]], PARAMS, adapter_id=adapters[1])[0].token_ids
    broken = tmp_path / "broken"
    shutil.copytree(adapters[1], broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterError, match="safetensors"):
        llm.generate([[1, 2, 3], [4, 5, 6]], PARAMS, adapter_id=[adapters[0], str(broken)])
    assert not engine.has_unfinished()  # the good request of the failed generate() call was not left queued
    assert engine.lora.slot_refs() == [0, 0] and not engine.lora._weights
    assert engine.pool.num_free == engine.pool.num_blocks


def test_adapter_changed_on_disk_is_a_new_adapter(base, adapters, tmp_path):
    llm = LLM(str(base), num_blocks=128, block_size=4, max_loras=2, max_lora_rank=32)
    path = tmp_path / "mutable"
    shutil.copytree(adapters[1], path)
    first = llm.generate([[9, 8, 7]], PARAMS, adapter_id=str(path))[0].token_ids
    shutil.rmtree(path)
    shutil.copytree(adapters[3], path)
    second = llm.generate([[9, 8, 7]], PARAMS, adapter_id=str(path))[0].token_ids
    assert second == llm.generate([[9, 8, 7]], PARAMS, adapter_id=adapters[3])[0].token_ids
    assert first != second


def test_adapters_need_slots(base, adapters):
    llm = LLM(str(base), num_blocks=32, block_size=4, max_loras=0)
    with pytest.raises(ValueError, match="max_loras=0"):
        llm.generate([[1, 2]], PARAMS, adapter_id=adapters[0])
    with pytest.raises(AdapterError, match="rank"):
        LLM(str(base), num_blocks=32, block_size=4, max_loras=1, max_lora_rank=8).generate(
            [[1, 2]], PARAMS, adapter_id=adapters[4])


def test_host_tier_skips_rereads_until_files_change(base, adapters, tmp_path):
    llm = LLM(str(base), num_blocks=64, block_size=4, max_loras=2, max_lora_rank=32)
    path = tmp_path / "cached"
    shutil.copytree(adapters[1], path)
    llm.generate([[1, 2], [3, 4]], PARAMS, adapter_id=str(path))
    assert llm.engine.adapters.stats().parses == 1  # the second request of the same adapter came from the host tier
    (path / "adapter_config.json").write_text((path / "adapter_config.json").read_text() + "\n")
    llm.generate([[1, 2]], PARAMS, adapter_id=str(path))
    assert llm.engine.adapters.stats().parses == 2  # a changed file is read again
