"""Evicting an adapter (admin unload) never takes the slot of a request that is running on it."""

from __future__ import annotations

from pathlib import Path

from transformers import LlamaConfig

from loraplex import LLM, SamplingParams
from tests.adapters.adapter_files import write_adapter
from tests.helpers import TINY, save_tiny

PARAMS = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)


def test_an_adapter_whose_slot_a_running_request_holds_is_not_evicted(tmp_path: Path) -> None:
    base = save_tiny(LlamaConfig(**TINY, architectures=["LlamaForCausalLM"]), tmp_path / "base")
    adapter = str(write_adapter(tmp_path / "roots" / "a", seed=3))
    llm = LLM(str(base), num_blocks=64, block_size=4, max_loras=2, max_lora_rank=8)
    alone = llm.generate([[5, 6, 7]], PARAMS, adapter_id=adapter)[0].token_ids
    engine, lora = llm.engine, llm.engine.lora
    assert lora is not None
    (identity,) = lora.resident()
    assert lora.evict(identity) and lora.resident() == []  # idle: evicted at once

    engine.add_request("r", [5, 6, 7], PARAMS, adapter_id=adapter)
    engine.wait_for_adapter_loads(30)
    outputs = engine.step()  # prefill: the request now holds a slot
    slot = lora.slot_of(identity)
    assert slot is not None and lora.slot_refs()[slot] == 1
    assert lora.evict(identity) is False  # refused: the request is running on it
    assert lora.slot_of(identity) == slot and lora.resident() == [identity]
    while engine.has_unfinished():
        outputs += engine.step()
    assert outputs[-1].finished and outputs[-1].token_ids == alone  # it ran on its own weights to the end
    assert lora.evict(identity) is True  # released: now it goes
