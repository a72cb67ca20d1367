"""The demo model (SmolLM2-135M-Instruct) through the engine against HF transformers, float32."""

from __future__ import annotations

import pytest
import torch

from loraplex import LLM, SamplingParams
from tests.helpers import engine_last_logits, hf_greedy, hf_model

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "A short poem about the sea:\n",
]


@pytest.fixture(scope="module")
def demo(demo_model_path):
    return LLM(str(demo_model_path)), hf_model(demo_model_path)


def test_demo_logits_and_greedy_match_hf(demo):
    llm, hf = demo
    tokenizer = llm.tokenizer
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    for ids in prompts:
        with torch.no_grad():
            expected = hf(torch.tensor([ids])).logits[0, -1]
        assert (engine_last_logits(llm, ids) - expected).abs().max().item() <= 1e-4
    outs = llm.generate(PROMPTS, SamplingParams(max_new_tokens=32, temperature=0.0, ignore_eos=True))
    for ids, out in zip(prompts, outs, strict=True):
        assert out.prompt_token_ids == ids  # text prompts tokenized exactly as HF's tokenizer does
        assert out.token_ids == hf_greedy(hf, ids, 32)
        assert out.text == tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_demo_chat_stops_at_eos(demo):
    llm, _ = demo
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(max_new_tokens=40, temperature=0.0))[0]
    assert "Paris" in out.text
    assert out.finish_reason == "eos_token"
    assert llm.engine.pool.num_free == llm.engine.pool.num_blocks


def test_demo_stop_string_and_logprobs(demo):
    llm, _ = demo
    out = llm.generate("The capital of France is", SamplingParams(max_new_tokens=32, temperature=0.0,
                                                                  stop=["."], logprobs=3))[0]
    assert out.finish_reason == "stop_sequence" and "." not in out.text and "Paris" in out.text
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
    first = out.logprobs[0]
    assert first.token_id == out.token_ids[0] and len(first.top) == 3
    assert first.top[0][0] == first.token_id  # greedy picks the most likely token
