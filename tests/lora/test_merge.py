"""Linear adapter merges (merged_adapters) equal PEFT's add_weighted_adapter(combination_type="cat")."""

from __future__ import annotations

import warnings
from concurrent.futures import Future

import pytest
import torch
from peft import LoraConfig
from transformers import LlamaConfig

from loraplex import LLM, SamplingParams
from loraplex.adapters.loader import LoadedAdapter
from loraplex.lora.adapter import AdapterInvalid
from loraplex.lora.merge import MergeSpec, merged_future
from tests.helpers import TINY, engine_last_logits, save_tiny
from tests.lora.peft_fixtures import make_adapter, peft_reference

PROMPT = [5, 17, 42, 99, 3, 250, 7]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("merge")
    base = save_tiny(LlamaConfig(**TINY), tmp / "base")
    a = make_adapter(base, tmp / "a", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), seed=1)
    b = make_adapter(base, tmp / "b", LoraConfig(r=8, lora_alpha=8, use_rslora=True,
                                                  target_modules=["q_proj", "o_proj", "down_proj"]), seed=2)
    return base, a, b


def test_linear_merge_equals_peft_cat(setup):
    base, a, b = setup
    peft = peft_reference(base, a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.load_adapter(str(b), adapter_name="b")
        peft.add_weighted_adapter(["default", "b"], [0.7, -0.4], "merged", combination_type="cat")
        peft.set_adapter("merged")
    with torch.no_grad():
        want = peft(torch.tensor([PROMPT])).logits[0, -1]
    llm = LLM(str(base), num_blocks=64, block_size=4, max_loras=2, max_lora_rank=16)
    got = engine_last_logits(llm, PROMPT, merge=MergeSpec((str(a), str(b)), (0.7, -0.4)))
    assert (got - want).abs().max().item() <= 1e-4
    alone = engine_last_logits(llm, PROMPT, adapter_id=str(a))
    assert (alone - want).abs().max().item() > 1e-2  # the merge is not just one of its parts


def test_merge_limits(setup):
    base, a, b = setup
    llm = LLM(str(base), num_blocks=64, block_size=4, max_loras=2, max_lora_rank=8)
    with pytest.raises(AdapterInvalid, match="rank 12"):  # 4 + 8 > max_lora_rank 8
        llm.generate([PROMPT], SamplingParams(max_new_tokens=1), merge=MergeSpec((str(a), str(b)), (0.5, 0.5)))
    with pytest.raises(ValueError, match="ties"):
        MergeSpec((str(a), str(b)), (0.5, 0.5), "ties")
    with pytest.raises(ValueError, match="weights"):
        MergeSpec((str(a), str(b)), (0.5,))


@pytest.mark.parametrize("weights", [(float("nan"), 1.0), (float("inf"), 1.0), (1.0, float("-inf"))])
def test_non_finite_merge_weights_are_refused(weights):
    with pytest.raises(ValueError, match="finite"):
        MergeSpec(("a", "b"), weights)


def test_a_merge_that_overflows_is_refused_before_it_takes_a_slot(setup):
    base, a, b = setup
    llm = LLM(str(base), num_blocks=64, block_size=4, max_loras=2, max_lora_rank=16)
    lora = llm.engine.lora
    # Finite weights whose product with the parts' scales overflows: served, it gave empty text (NaN logits).
    with pytest.raises(AdapterInvalid, match="overflows"):
        llm.generate([PROMPT], SamplingParams(max_new_tokens=2), merge=MergeSpec((str(a), str(b)), (1e308, 1e308)))
    assert lora.loads == 0 and lora.resident() == []  # no device slot was spent on it
    out = llm.generate([PROMPT], SamplingParams(max_new_tokens=2), merge=MergeSpec((str(a), str(b)), (0.5, 0.5)))
    assert len(out[0].token_ids) == 2 and lora.loads == 1


def test_a_part_whose_load_raises_anything_still_finishes_the_merge():
    """A part failing with a non-AdapterError (an OSError for a bad path ...) used to be raised inside a
    Future callback, where it is lost: the merged Future never finished and the request waited for ever."""
    broken: Future[LoadedAdapter] = Future()
    pending: Future[LoadedAdapter] = Future()
    merged = merged_future(MergeSpec(("p0", "p1"), (0.5, 0.5)), [broken, pending], 8, lambda w: w)
    broken.set_exception(ValueError("embedded null byte"))
    assert not merged.done()  # it waits for every part
    pending.set_exception(OSError(36, "File name too long"))
    assert isinstance(merged.exception(timeout=5), ValueError | OSError)
