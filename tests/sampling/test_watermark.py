"""The watermark makes generated text detectably favour each step's green list; without it, nothing shows."""

from __future__ import annotations

import math

import pytest
from transformers import LlamaConfig

from loraplex import LLM, SamplingParams
from loraplex.sampling.penalties import WATERMARK_GAMMA, watermark_greenlist
from tests.helpers import TINY, save_tiny


def z_score(prompt: list[int], tokens: list[int], vocab: int) -> float:
    """The detector: how far the count of green tokens is above chance, in standard deviations."""
    previous = [prompt[-1], *tokens[:-1]]
    green = sum(t in set(watermark_greenlist(p, vocab, "cpu").tolist()) for p, t in zip(previous, tokens, strict=True))
    n = len(tokens)
    return (green - WATERMARK_GAMMA * n) / math.sqrt(n * WATERMARK_GAMMA * (1 - WATERMARK_GAMMA))


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    # Small logits (low initializer range) keep the model's own preferences weak, as a real model's are
    # on most steps, so the watermark's bias is what decides.
    path = save_tiny(LlamaConfig(**{**TINY, "initializer_range": 0.02}), tmp_path_factory.mktemp("llama"))
    return LLM(str(path), num_blocks=128, block_size=16)


def test_watermarked_text_is_detected(llm):
    prompt = [11, 12, 13]
    params = dict(max_new_tokens=150, temperature=1.0, ignore_eos=True, seed=5)
    marked = llm.generate([prompt], SamplingParams(**params, watermark=True))[0].token_ids
    plain = llm.generate([prompt], SamplingParams(**params))[0].token_ids
    assert z_score(prompt, marked, 512) > 4
    assert abs(z_score(prompt, plain, 512)) < 3


def test_greenlist_depends_on_the_previous_token_only():
    a, b = watermark_greenlist(7, 1000, "cpu"), watermark_greenlist(7, 1000, "cpu")
    assert a.tolist() == b.tolist() and len(a) == 500 and len(set(a.tolist())) == 500
    assert set(a.tolist()) != set(watermark_greenlist(8, 1000, "cpu").tolist())
