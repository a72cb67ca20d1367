"""The decoder against HF transformers, per architecture: same greedy tokens, logits within 1e-4 (float32)."""

from __future__ import annotations

import pytest
import torch
from transformers import GemmaConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config

from loraplex import LLM, SamplingParams
from tests.helpers import TINY, engine_last_logits, hf_greedy, hf_model, save_tiny

HALF_ROTARY = 8  # rotary_dim / 2 for head_dim 16

CONFIGS = {
    "llama": lambda: LlamaConfig(**TINY),
    "llama-tied-bias": lambda: LlamaConfig(**TINY, tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    "llama-rope-linear": lambda: LlamaConfig(**TINY, rope_parameters={
        "rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}),
    "llama-rope-llama3": lambda: LlamaConfig(**TINY, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64, "rope_theta": 500000.0}),
    "llama-rope-yarn": lambda: LlamaConfig(**TINY, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "rope_theta": 10000.0}),
    "mistral-sliding": lambda: MistralConfig(**TINY, sliding_window=7),
    "qwen2": lambda: Qwen2Config(**TINY),
    "qwen3": lambda: Qwen3Config(**TINY, head_dim=24),
    "gemma": lambda: GemmaConfig(**{**TINY, "num_key_value_heads": 1}, head_dim=16),
    "phi3": lambda: Phi3Config(**TINY, pad_token_id=0),
    "phi3-longrope-partial": lambda: Phi3Config(**TINY, pad_token_id=0, original_max_position_embeddings=128,
                                                rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
        "short_factor": [1.0 + i / 10 for i in range(HALF_ROTARY // 2)],
        "long_factor": [2.0 + i / 5 for i in range(HALF_ROTARY // 2)]}),
}

PROMPTS = [[5, 17, 42, 99, 3, 250, 7, 7, 8, 301, 44], [1, 2], list(range(40, 77))]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return save_tiny(CONFIGS[request.param](), path)


def test_logits_match_hf(checkpoint):
    hf = hf_model(checkpoint)
    llm = LLM(str(checkpoint), num_blocks=64, block_size=4)
    for prompt in PROMPTS:
        with torch.no_grad():
            expected = hf(torch.tensor([prompt])).logits[0, -1]
        got = engine_last_logits(llm, prompt)
        assert (got - expected).abs().max().item() <= 1e-4
        # Random models have flat logits; make sure the comparison is not vacuous.
        assert expected.std() > 1e-2


def test_greedy_matches_hf(checkpoint):
    hf = hf_model(checkpoint)
    # Small blocks make every sequence span many blocks; a short prefill budget chunks the long prompt.
    llm = LLM(str(checkpoint), num_blocks=128, block_size=4, max_num_batched_tokens=16)
    params = SamplingParams(max_new_tokens=32, temperature=0.0, ignore_eos=True)
    outs = llm.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert out.token_ids == hf_greedy(hf, prompt, 32)
        assert out.finish_reason == "length"
