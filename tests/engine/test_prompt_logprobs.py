"""Prompt logprobs (the native API's decoder_input_details) equal HF transformers' and PEFT's."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from transformers import LlamaConfig

from loraplex import LLM, SamplingParams
from tests.helpers import TINY, hf_model, save_tiny
from tests.lora.peft_fixtures import make_adapter, peft_reference


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(LlamaConfig(**TINY), tmp_path_factory.mktemp("llama"))


def reference(model, prompt: list[int]) -> list[float | None]:
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)
    return [None] + [logprobs[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)]


def test_prompt_logprobs_match_hf_with_chunks_and_adapters(tiny, tmp_path):
    adapter = make_adapter(tiny, tmp_path / "a", LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj",
                                                                                                 "lm_head"]), seed=3)
    prompts = [[5 + i % 400 for i in range(37)], [9, 8, 7], [3] * 20]
    # A 16-token step budget chunks the 37-token prompt; the prefix cache must not skip any scored position.
    llm = LLM(str(tiny), num_blocks=128, block_size=4, max_num_batched_tokens=16, max_loras=2, max_lora_rank=8)
    llm.generate([prompts[0][:24]], SamplingParams(max_new_tokens=1))  # warms the prefix cache
    params = SamplingParams(max_new_tokens=2, temperature=0, prompt_logprobs=True)
    outs = llm.generate(prompts, params, adapter_id=[None, str(adapter), None])
    base, peft = hf_model(tiny), peft_reference(tiny, adapter)
    for out, prompt, model in zip(outs, prompts, [base, peft, base], strict=True):
        want = reference(model, prompt)
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
        assert out.prompt_logprobs[1:] == pytest.approx(want[1:], abs=1e-4)
    assert llm.generate(prompts[:1], SamplingParams(max_new_tokens=1))[0].prompt_logprobs is None
