"""The manager's slots outside requests: pins (admin API), warm preloads (startup), and the LM-head LoRA
buffers installed on the first adapter that targets lm_head."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from transformers import LlamaConfig

from loraplex import LLM, SamplingParams
from loraplex.adapters.ref import AdapterIdentity
from loraplex.engine.sequence import Sequence
from loraplex.lora.adapter import AdapterWeights, load_adapter
from loraplex.lora.manager import LoRAManager, NoFreeSlot
from tests.adapters.adapter_files import write_adapter
from tests.helpers import TINY, save_tiny
from tests.lora.peft_fixtures import make_adapter

PARAMS = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(LlamaConfig(**TINY, architectures=["LlamaForCausalLM"]), tmp_path_factory.mktemp("base"))


def _two_slots_four_adapters(tiny_base: Path, tmp_path: Path) -> tuple[
        LoRAManager, dict[str, Path], dict[str, AdapterIdentity], dict[str, AdapterWeights]]:
    """An engine's LoRA manager with 2 slots, and adapters a-d: their folders, identities and parsed weights."""
    lora = LLM(str(tiny_base), num_blocks=64, block_size=4, max_loras=2, max_lora_rank=8).engine.lora
    assert lora is not None
    paths = {name: write_adapter(tmp_path / name, seed=i) for i, name in enumerate("abcd")}
    ids = {name: AdapterIdentity("local", str(p), f"hash-{name}") for name, p in paths.items()}
    return lora, paths, ids, {name: lora.parse(p) for name, p in paths.items()}


def test_pins_hold_a_slot_until_unpinned_and_warm_loads_stay_evictable(tiny_base: Path, tmp_path: Path) -> None:
    lora, paths, ids, weights = _two_slots_four_adapters(tiny_base, tmp_path)

    slot = lora.pin(ids["a"], weights["a"])
    assert lora.is_pinned(ids["a"]) and lora.slot_of(ids["a"]) == slot
    assert lora.slot_refs()[slot] == 1 and lora.weights_of(ids["a"]) is weights["a"]
    assert lora.pin(ids["a"], weights["a"]) == slot and lora.slot_refs()[slot] == 1  # pinning twice: one pin
    assert lora.evict(ids["a"]) is False  # pinned: not evictable

    other = lora.warm(ids["b"], weights["b"])
    assert other is not None and other != slot and lora.slot_of(ids["b"]) == other
    assert lora.slot_refs()[other] == 0 and lora.weights_of(ids["b"]) is None  # resident, held by nothing
    assert lora.warm(ids["b"], weights["b"]) == other
    assert lora.warm(ids["c"], weights["c"]) == other  # the idle slot is reused: b made way for c
    assert lora.slot_of(ids["b"]) is None

    assert lora.pin(ids["d"], weights["d"]) == other  # a pin takes an idle slot, evicting the warm c
    assert lora.warm(ids["c"], weights["c"]) is None  # nothing idle now
    with pytest.raises(NoFreeSlot, match="all 2 device slots hold adapters in use"):
        lora.pin(ids["c"], weights["c"])

    assert lora.unpin(ids["a"]) is True and not lora.is_pinned(ids["a"])
    assert lora.slot_refs()[slot] == 0 and lora.weights_of(ids["a"]) is None
    assert lora.slot_of(ids["a"]) == slot  # still resident until its slot is needed
    assert lora.unpin(ids["a"]) is False
    assert lora.evict(ids["a"]) is True and lora.slot_of(ids["a"]) is None
    assert lora.pin(ids["c"], weights["c"]) == slot


def test_a_pinned_adapter_serves_its_requests_as_an_unpinned_one(tiny_base: Path, tmp_path: Path) -> None:
    path = str(write_adapter(tmp_path / "a", seed=5))
    want = LLM(str(tiny_base), num_blocks=64, block_size=4, max_loras=1, max_lora_rank=8).generate(
        [[3, 4, 5]], PARAMS, adapter_id=path)[0].token_ids
    llm = LLM(str(tiny_base), num_blocks=64, block_size=4, max_loras=1, max_lora_rank=8)
    lora = llm.engine.lora
    assert lora is not None
    llm.generate([[3, 4, 5]], PARAMS, adapter_id=path)  # the engine's identity for the folder
    (identity,) = lora.resident()
    assert lora.evict(identity)
    lora.pin(identity, lora.parse(Path(path)))
    assert llm.generate([[3, 4, 5]], PARAMS, adapter_id=path)[0].token_ids == want
    assert lora.is_pinned(identity) and lora.slot_refs() == [1] and lora.loads == 2


def test_lm_head_adapters_get_head_buffers_on_first_use(tiny_base: Path, tmp_path: Path) -> None:
    plain = str(write_adapter(tmp_path / "plain", seed=1))
    head = str(make_adapter(tiny_base, tmp_path / "head",
                            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]), seed=2))
    solo = {p: LLM(str(tiny_base), num_blocks=64, block_size=4, max_loras=1, max_lora_rank=8).generate(
        [[7, 8, 9]], PARAMS, adapter_id=p)[0].token_ids for p in (plain, head)}
    llm = LLM(str(tiny_base), num_blocks=64, block_size=4, max_loras=1, max_lora_rank=8)
    model = llm.engine.runner.model
    llm.generate([[7, 8, 9]], PARAMS, adapter_id=plain)
    assert model.lora_head is None  # no adapter has needed one yet
    # One slot, used in turn: the head rows are loaded with the head adapter and cleared for the plain one.
    for p in (head, plain, head):
        assert llm.generate([[7, 8, 9]], PARAMS, adapter_id=p)[0].token_ids == solo[p], p
        lora_head = model.lora_head
        assert lora_head is not None
        assert int(lora_head.ranks[0]) == (4 if p == head else 0), p
        assert bool(lora_head.b[0].any()) == (p == head) and bool(lora_head.a[0].any()) == (p == head), p
    hidden, vocab = TINY["hidden_size"], TINY["vocab_size"]
    assert lora_head.a.shape == (1, 8, hidden) and lora_head.b.shape == (1, 8, vocab)
    assert lora_head.a.dtype == model.model.embed_tokens.weight.dtype == torch.float32
    assert solo[head] != LLM(str(tiny_base), num_blocks=64, block_size=4).generate([[7, 8, 9]], PARAMS)[0].token_ids


def test_packed_rows_count_in_host_bytes_and_idle_slots_are_reused_least_recently_used_first(
        tiny_base: Path, tmp_path: Path) -> None:
    lora, paths, ids, weights = _two_slots_four_adapters(tiny_base, tmp_path)

    raw = load_adapter(paths["a"], lora.base_config, lora.config.max_lora_rank)
    assert weights["a"].packed is not None
    packed = sum(c.nbytes for layer in weights["a"].packed for c in layer if c is not None)
    assert packed > 0 and weights["a"].size_bytes == raw.size_bytes + packed  # the host tier's budget
    assert lora.prepare(weights["a"]) is weights["a"]

    for name in "ab":
        lora.warm(ids[name], weights[name])
    lora.warm(ids["c"], weights["c"])  # replaces a, the idle adapter used least recently
    assert lora.slot_of(ids["a"]) is None and lora.slot_of(ids["b"]) is not None
    slot_b = lora.slot_of(ids["b"])
    assert lora.evict(ids["b"])  # an evicted slot is reused first, before c's
    assert lora.warm(ids["d"], weights["d"]) == slot_b and lora.slot_of(ids["c"]) is not None
    # A request's adapter takes an idle slot the same way: c's, used less recently than d's.
    seq = Sequence("r", [1, 2], SamplingParams(), 0)
    seq.adapter = ids["a"]
    lora.hold(ids["a"], weights["a"])
    assert lora.acquire(seq)
    assert lora.slot_of(ids["c"]) is None and lora.slot_of(ids["d"]) == slot_b
    lora.release(seq)
    lora.drop(ids["a"])
