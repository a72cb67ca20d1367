"""Linear adapter merges (merged_adapters) equal PEFT's add_weighted_adapter(combination_type="cat")."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig
from transformers import LlamaConfig

from loraplex import LLM, SamplingParams
from loraplex.lora.adapter import AdapterInvalid
from loraplex.lora.merge import MergeSpec
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
