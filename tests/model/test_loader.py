"""Checkpoint loading errors name what is wrong; the KV pool follows the memory budget."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig

from loraplex import LLM, SamplingParams
from loraplex.kv.block_pool import KVCache
from loraplex.model.loader import CheckpointError
from loraplex.model.registry import UnsupportedArchitecture
from tests.helpers import TINY, save_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(LlamaConfig(**TINY), tmp_path_factory.mktemp("tiny"))


def _copy_with(tiny, tmp_path, edit_tensors=None, edit_config=None):
    config = json.loads((tiny / "config.json").read_text())
    tensors = load_file(tiny / "model.safetensors")
    if edit_config:
        edit_config(config)
    if edit_tensors:
        edit_tensors(tensors)
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(tensors, tmp_path / "model.safetensors")
    return str(tmp_path)


def test_unsupported_architecture_is_named(tiny, tmp_path):
    path = _copy_with(tiny, tmp_path, edit_config=lambda c: c.update(architectures=["FancyNetForCausalLM"]))
    with pytest.raises(UnsupportedArchitecture, match="FancyNetForCausalLM"):
        LLM(path, num_blocks=8)


def test_missing_tensor_is_named(tiny, tmp_path):
    path = _copy_with(tiny, tmp_path, edit_tensors=lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.qkv_proj\.weight"):
        LLM(path, num_blocks=8)


def test_wrong_shape_is_named(tiny, tmp_path):
    def shrink(t):
        t["model.layers.0.mlp.down_proj.weight"] = t["model.layers.0.mlp.down_proj.weight"][:, :10].contiguous()
    path = _copy_with(tiny, tmp_path, edit_tensors=shrink)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.down_proj\.weight"):
        LLM(path, num_blocks=8)


def test_unexpected_tensor_is_named(tiny, tmp_path):
    path = _copy_with(tiny, tmp_path, edit_tensors=lambda t: t.update({"model.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"model\.extra\.weight"):
        LLM(path, num_blocks=8)


def test_kv_pool_is_sized_by_the_memory_budget(tiny):
    budget = 3 << 20
    llm = LLM(str(tiny), kv_cache_bytes=budget, block_size=8)
    per_block = KVCache.bytes_per_block(TINY["num_hidden_layers"], 8, TINY["num_key_value_heads"],
                                        TINY["hidden_size"] // TINY["num_attention_heads"], torch.float32)
    assert llm.engine.pool.num_blocks == budget // per_block
    assert llm.engine.kv_cache.data.numel() * 4 <= budget


def test_config_errors_name_the_value(tiny):
    with pytest.raises(ValueError, match="block_size must be a power of two, got 12"):
        LLM(str(tiny), block_size=12)
    with pytest.raises(TypeError, match="unknown option 'blocksize'"):
        LLM(str(tiny), blocksize=16)
    with pytest.raises(ValueError, match="unknown LoRA op backend 'cuda-magic'"):
        LLM(str(tiny), lora_backend="cuda-magic")


def test_per_prompt_lists_must_match_the_prompts(tiny):
    llm = LLM(str(tiny), num_blocks=16, block_size=4)
    params = SamplingParams(max_new_tokens=2)
    with pytest.raises(ValueError, match="got 3 SamplingParams for 2 prompts"):
        llm.generate([[1, 2], [3, 4]], [params] * 3)
    with pytest.raises(ValueError, match="got 1 adapter ids for 2 prompts"):
        llm.generate([[1, 2], [3, 4]], params, adapter_id=[None])
    assert [len(o.token_ids) for o in llm.generate([[1, 2], [3, 4]], [params, params], adapter_id=[None, None])] == [2, 2]
