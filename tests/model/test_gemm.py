"""The linear backends (loraplex/model/gemm.py): which one `auto` picks, and that both compute the same model."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from transformers import LlamaConfig

from loraplex import LLM, SamplingParams
from loraplex.config import ModelConfig
from loraplex.model import gemm
from loraplex.model.layers import PackedLinear
from tests.helpers import TINY, engine_last_logits, hf_model, save_tiny
from tests.lora.peft_fixtures import make_adapter, peft_reference

ONEDNN = gemm.onednn_supported(torch.device("cpu"), torch.float32)
needs_onednn = pytest.mark.skipif(not ONEDNN, reason="this torch build has no oneDNN linear ops")
PROMPT = [5, 17, 42, 99, 3, 250, 7, 7, 8, 301, 44]


def test_auto_picks_onednn_only_for_float32_on_the_cpu():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert gemm.resolve("auto", cpu, torch.float32) == ("onednn" if ONEDNN else "aten")
    assert gemm.resolve("auto", cpu, torch.bfloat16) == "aten"
    assert gemm.resolve("auto", cuda, torch.float32) == "aten"
    assert gemm.resolve("aten", cpu, torch.float32) == "aten"
    with pytest.raises(ValueError, match="onednn' needs float32 weights on the CPU"):
        gemm.resolve("onednn", cuda, torch.bfloat16)
    with pytest.raises(ValueError, match="linear_backend must be one of"):
        ModelConfig(linear_backend="mkl")
    assert ModelConfig(device="cpu", dtype="bfloat16").resolved_linear_backend() == "aten"


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_backends_agree(bias):
    torch.manual_seed(0)
    layers = {}
    for backend in ("aten", "onednn"):
        layer = PackedLinear(48, [40, 24], bias)
        torch.manual_seed(1)
        layer.weight.data.normal_()
        if bias:
            layer.bias.data.normal_()
        weight = layer.weight.data.clone()
        layer.finalize(backend)
        layers[backend] = layer
    assert layers["onednn"].weight_t is None and layers["onednn"].packed is not None
    for tokens in (1, 7, 300):
        x = torch.randn(tokens, 48)
        expected = torch.nn.functional.linear(x, weight, layers["aten"].bias)
        for backend, layer in layers.items():
            assert (layer(x) - expected).abs().max().item() < 1e-4, (backend, tokens)
    # The plain weight comes back exactly from the packed one (DoRA factors are built from it).
    assert torch.equal(layers["onednn"].dense_t(), weight.t())
    assert torch.equal(layers["aten"].dense_t(), weight.t())


@needs_onednn
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_both_backends_match_hf(tmp_path, tied):
    path = save_tiny(LlamaConfig(**TINY, tie_word_embeddings=tied, attention_bias=True), tmp_path / "m")
    hf = hf_model(path)
    with torch.no_grad():
        expected = hf(torch.tensor([PROMPT])).logits[0, -1]
    tokens = {}
    for backend in ("aten", "onednn"):
        llm = LLM(str(path), num_blocks=64, block_size=4, linear_backend=backend)
        assert llm.engine.linear_backend == backend
        head = llm.engine.runner.model.lm_head
        if backend == "onednn":  # tied or not, the head is a packed linear of its own
            assert head is not None and head.packed is not None
        else:
            assert (head is None) == tied
        got = engine_last_logits(llm, PROMPT)
        assert (got - expected).abs().max().item() <= 1e-4, backend
        tokens[backend] = llm.generate([PROMPT], SamplingParams(max_new_tokens=12, temperature=0.0))[0].token_ids
    assert tokens["aten"] == tokens["onednn"]


@needs_onednn
def test_dora_on_a_packed_base_matches_peft(tmp_path):
    """DoRA's row factors need the plain base weight: on the onednn backend it is unpacked from the
    prepacked one, and the adapted logits still match PEFT."""
    path = save_tiny(LlamaConfig(**TINY), tmp_path / "m")
    adapter = make_adapter(path, tmp_path / "dora", LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16,
                           target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"], use_dora=True), seed=3)
    with torch.no_grad():
        expected = peft_reference(path, adapter)(torch.tensor([PROMPT])).logits[0, -1]
    llm = LLM(str(path), num_blocks=64, block_size=4, max_loras=2, max_lora_rank=8, linear_backend="onednn")
    got = engine_last_logits(llm, PROMPT, adapter_id=str(adapter))
    assert (got - expected).abs().max().item() <= 1e-4
    assert (got - engine_last_logits(llm, PROMPT)).abs().max().item() > 0.1  # the adapter does change them
