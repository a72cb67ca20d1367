"""GGUF files: `read_gguf` against the tensors written and against transformers' own GGUF loading,
and a GGUF as the engine's base model against HF generation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from loraplex import LLM, SamplingParams
from loraplex.model.gguf import read_gguf
from tests.gguf_fixtures import HEADS, KV_HEADS, LAYERS, write_tiny_llama_gguf
from tests.helpers import hf_greedy


@pytest.mark.parametrize("tied", [True, False])
def test_read_gguf_restores_hf_tensors(tmp_path: Path, tied: bool) -> None:
    expected = write_tiny_llama_gguf(tmp_path / "tiny.gguf", tied=tied)
    checkpoint = read_gguf(tmp_path / "tiny.gguf")

    assert sorted(checkpoint.tensors) == sorted(expected)
    for name, value in expected.items():
        assert checkpoint.tensors[name].dtype == torch.float32
        torch.testing.assert_close(checkpoint.tensors[name], value, rtol=0, atol=0, msg=name)

    config = checkpoint.config
    assert config.architectures == ["LlamaForCausalLM"]
    assert getattr(config, "quantization_config", None) is None
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (LAYERS, HEADS, KV_HEADS)
    assert config.tie_word_embeddings is tied

    tokenizer = checkpoint.tokenizer
    assert tokenizer.decode(tokenizer("the cat").input_ids) == "the cat"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_read_gguf_matches_transformers_gguf_loading(tmp_path: Path) -> None:
    write_tiny_llama_gguf(tmp_path / "tiny.gguf", tied=True)
    checkpoint = read_gguf(tmp_path / "tiny.gguf")
    ours = AutoModelForCausalLM.from_config(checkpoint.config, dtype=torch.float32)
    info = ours.load_state_dict(checkpoint.tensors, strict=False)
    assert info.unexpected_keys == [] and set(info.missing_keys) <= {"lm_head.weight"}
    ours.tie_weights()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)
    ids = torch.tensor([[1, 40, 70, 100, 5]])
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids).logits, reference.eval()(ids).logits, rtol=0, atol=1e-6)


def test_read_gguf_rejects_unsupported_architecture(tmp_path: Path) -> None:
    write_tiny_llama_gguf(tmp_path / "odd.gguf", arch="rwkv7")
    with pytest.raises(ValueError, match="'rwkv7'"):
        read_gguf(tmp_path / "odd.gguf")


def test_read_gguf_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        read_gguf(tmp_path / "nope.gguf")


@pytest.mark.parametrize("tied", [True, False])
def test_engine_generates_from_gguf_as_hf_does(tmp_path: Path, tied: bool) -> None:
    write_tiny_llama_gguf(tmp_path / "tiny.gguf", tied=tied, layers=3)
    llm = LLM(str(tmp_path / "tiny.gguf"), num_blocks=64, block_size=4, dtype="float32")
    assert llm.tokenizer is not None and llm.tokenizer.decode(llm.tokenizer("the cat").input_ids) == "the cat"
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    prompts = [[1, 40, 70, 100, 5], [200, 3], list(range(60, 83))]

    outs = llm.generate(prompts, SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True))

    for prompt, out in zip(prompts, outs, strict=True):
        # eos_token_id=None: min_new_tokens would otherwise mask eos, which ignore_eos does not.
        expected = hf_greedy(reference, prompt, 16)
        assert out.token_ids == expected
        assert len(set(expected)) > 1  # a model stuck on one token would make the match vacuous
