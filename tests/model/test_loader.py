"""Checkpoint loading errors name what is wrong; the KV pool follows the memory budget."""

from __future__ import annotations

import json
import subprocess
import sys

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


# int4 quantizes each layer as its tensors arrive (no float model first): its load checks them the same way.
@pytest.mark.parametrize("quantize", ["none", "int4"])
def test_missing_tensor_is_named(tiny, tmp_path, quantize):
    path = _copy_with(tiny, tmp_path, edit_tensors=lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.qkv_proj\.weight"):
        LLM(path, num_blocks=8, device="cpu", quantize=quantize)


@pytest.mark.parametrize("quantize", ["none", "int4"])
def test_wrong_shape_is_named(tiny, tmp_path, quantize):
    def shrink(t):
        t["model.layers.0.mlp.down_proj.weight"] = t["model.layers.0.mlp.down_proj.weight"][:, :10].contiguous()
    path = _copy_with(tiny, tmp_path, edit_tensors=shrink)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.down_proj\.weight"):
        LLM(path, num_blocks=8, device="cpu", quantize=quantize)


def test_a_tensor_twice_is_named_when_its_layer_was_quantized(tiny, tmp_path):
    path = _copy_with(tiny, tmp_path)  # a second file, read after the first: the layer is quantized by then
    save_file({"model.layers.0.self_attn.o_proj.weight": torch.zeros(64, 64)}, tmp_path / "model-2.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.o_proj\.weight appears twice"):
        LLM(path, num_blocks=8, device="cpu", quantize="int4")


# VmHWM, not getrusage's ru_maxrss: that one keeps the parent's peak across fork and exec (a test run's GBs).
PEAK_RSS = """
import sys
from pathlib import Path
import torch
from loraplex.model.loader import build_model, open_checkpoint
def status(field):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field + ":"))
ckpt = open_checkpoint(Path(sys.argv[1]), keep_int4=True)
before = status("VmRSS")
build_model(ckpt, torch.float32, torch.device("cpu"), 512, "aten", sys.argv[2])
print(status("VmHWM") - before)  # the peak since
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_an_int4_load_never_holds_the_float_linears(tmp_path):
    # 16 layers whose linears are 234 MiB in float32: loaded as float, the process's peak grows by them (and by
    # the checkpoint file's pages); quantized layer by layer as their tensors arrive, by at least half of them
    # less (measured: +493 to +514 MiB against +311 to +333 MiB, the file's 234 MiB of pages in both).
    config = dict(TINY, hidden_size=512, intermediate_size=2048, num_hidden_layers=16, num_attention_heads=8,
                  num_key_value_heads=2, initializer_range=0.02)
    base = save_tiny(LlamaConfig(**config), tmp_path / "m")
    per_layer = 512 * (512 + 2 * 128) + 512 * 512 + 3 * 512 * 2048
    linear_bytes = 4 * 16 * per_layer
    growth = {q: int(subprocess.run([sys.executable, "-c", PEAK_RSS, str(base), q], capture_output=True, text=True,
                                    check=True, timeout=300).stdout.split()[-1]) for q in ("none", "int4")}
    assert growth["none"] > linear_bytes  # the float model was there
    assert growth["int4"] < growth["none"] - 0.5 * linear_bytes, (growth, linear_bytes)


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
    with pytest.raises(ValueError, match="lora_dtype must be 'auto' or one of .*, got 'int8'"):
        LLM(str(tiny), lora_dtype="int8")


def test_per_prompt_lists_must_match_the_prompts(tiny):
    llm = LLM(str(tiny), num_blocks=16, block_size=4)
    params = SamplingParams(max_new_tokens=2)
    with pytest.raises(ValueError, match="got 3 SamplingParams for 2 prompts"):
        llm.generate([[1, 2], [3, 4]], [params] * 3)
    with pytest.raises(ValueError, match="got 1 adapter ids for 2 prompts"):
        llm.generate([[1, 2], [3, 4]], params, adapter_id=[None])
    assert [len(o.token_ids) for o in llm.generate([[1, 2], [3, 4]], [params, params], adapter_id=[None, None])] == [2, 2]
