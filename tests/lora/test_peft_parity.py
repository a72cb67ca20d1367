"""LoRA serving against PEFT, float32: logits within 1e-4 and the same greedy tokens, one adapter at a time
and in batches that mix the base model with many adapters (fewer device slots than adapters included)."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig
from transformers import LlamaConfig, Phi3Config, Qwen2Config

from loraplex import LLM, SamplingParams
from tests.helpers import TINY, engine_last_logits, hf_greedy, hf_model, save_tiny
from tests.lora.peft_fixtures import DEMO_STRENGTH, make_adapter, peft_reference

QV = ["q_proj", "v_proj"]
ALL_SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PHI3_FUSED = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]

BASES: dict[str, Callable[[], Any]] = {
    "llama": lambda: LlamaConfig(**TINY),
    "qwen2": lambda: Qwen2Config(**TINY),  # q/k/v biases
    "phi3": lambda: Phi3Config(**TINY, pad_token_id=0),  # fused qkv_proj and gate_up_proj
}

# name → (base, LoraConfig fields). The llama adapters are also the eight of the mixed-batch tests.
ADAPTERS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-qv-r4": ("llama", dict(r=4, lora_alpha=8, target_modules=QV)),
    "llama-all-r16-rslora": ("llama", dict(r=16, lora_alpha=8, use_rslora=True, target_modules=ALL_SEVEN)),
    "llama-all-r64": ("llama", dict(r=64, lora_alpha=128, target_modules=ALL_SEVEN)),
    "llama-all-r8-dora": ("llama", dict(r=8, lora_alpha=16, use_dora=True, target_modules=ALL_SEVEN)),
    "llama-patterns": ("llama", dict(r=8, lora_alpha=16, target_modules=ALL_SEVEN,
                                     rank_pattern={"k_proj": 4, "model.layers.1.mlp.down_proj": 32},
                                     alpha_pattern={"o_proj": 64, r"layers\.2\.self_attn\.q_proj": 3})),
    "llama-dora-rslora-patterns": ("llama", dict(r=32, lora_alpha=24, use_dora=True, use_rslora=True,
                                                 target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                                                 rank_pattern={"v_proj": 12}, alpha_pattern={"down_proj": 6})),
    "llama-mlp-lm_head-r12": ("llama", dict(r=12, lora_alpha=20,
                                            target_modules=["gate_proj", "up_proj", "down_proj", "lm_head"])),
    "llama-ko-r24-layers02": ("llama", dict(r=24, lora_alpha=16, target_modules=["k_proj", "o_proj"],
                                            layers_to_transform=[0, 2])),
    "qwen2-qv-r8": ("qwen2", dict(r=8, lora_alpha=16, target_modules=QV)),
    "qwen2-all-r32-rslora-dora": ("qwen2", dict(r=32, lora_alpha=16, use_rslora=True, use_dora=True,
                                                target_modules=ALL_SEVEN)),
    "phi3-fused-r8": ("phi3", dict(r=8, lora_alpha=16, target_modules=PHI3_FUSED)),
    "phi3-fused-r16-dora-patterns": ("phi3", dict(r=16, lora_alpha=32, use_dora=True, target_modules=PHI3_FUSED,
                                                  rank_pattern={"qkv_proj": 4, "model.layers.0.mlp.down_proj": 40},
                                                  alpha_pattern={"gate_up_proj": 48})),
    "demo-qv-r8": ("demo", dict(r=8, lora_alpha=16, target_modules=QV)),
    "demo-all-r16-rslora": ("demo", dict(r=16, lora_alpha=16, use_rslora=True, target_modules=ALL_SEVEN)),
    "demo-qv-r8-dora": ("demo", dict(r=8, lora_alpha=16, use_dora=True, target_modules=QV)),
}
LLAMA_ADAPTERS = [name for name, (base, _) in ADAPTERS.items() if base == "llama"]

TINY_PROMPTS = [[5, 17, 42, 99, 3, 250, 7, 7, 8, 301, 44], [1, 2], list(range(40, 77))]
DEMO_PROMPTS = ["The capital of France is", "def fibonacci(n):\n    "]
GREEDY_32 = SamplingParams(max_new_tokens=32, temperature=0.0, ignore_eos=True)
TOL = 1e-4


class Zoo:
    """Base checkpoints, engines and adapter folders, built on first use and shared by the module's tests."""

    def __init__(self, tmp: pytest.TempPathFactory, demo_path: Callable[[], Path]) -> None:
        self._tmp = tmp
        self._demo_path = demo_path
        self._bases: dict[str, Path] = {}
        self._llms: dict[str, LLM] = {}
        self._adapters: dict[str, Path] = {}

    def base(self, name: str) -> Path:
        if name not in self._bases:
            self._bases[name] = (self._demo_path() if name == "demo"
                                 else save_tiny(BASES[name](), self._tmp.mktemp(name)))
        return self._bases[name]

    def llm(self, name: str) -> LLM:
        if name not in self._llms:
            self._llms[name] = LLM(str(self.base(name)), max_loras=8, max_lora_rank=64, num_blocks=256,
                                   block_size=4)
        return self._llms[name]

    def adapter(self, name: str) -> str:
        if name not in self._adapters:
            base, fields = ADAPTERS[name]
            config = LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **fields)
            seed = list(ADAPTERS).index(name)
            strength = DEMO_STRENGTH if base == "demo" else {}
            self._adapters[name] = make_adapter(self.base(base), self._tmp.mktemp(name), config, seed, **strength)
        return str(self._adapters[name])


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Zoo:
    return Zoo(tmp_path_factory, lambda: request.getfixturevalue("demo_model_path"))


@pytest.fixture(scope="module", params=list(ADAPTERS))
def case(request: pytest.FixtureRequest, zoo: Zoo) -> tuple[str, LLM, Any, str, list[list[int]]]:
    """(name, engine for the adapter's base, PEFT reference model, adapter folder, prompt token ids)."""
    name = request.param
    base = ADAPTERS[name][0]
    llm = zoo.llm(base)
    adapter = zoo.adapter(name)
    prompts = [llm.tokenizer(p).input_ids for p in DEMO_PROMPTS] if base == "demo" else TINY_PROMPTS
    return name, llm, peft_reference(zoo.base(base), Path(adapter)), adapter, prompts


def test_logits_match_peft(case):
    name, llm, peft_model, adapter, prompts = case
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            expected = peft_model(ids).logits[0, -1]
            with peft_model.disable_adapter():
                base = peft_model(ids).logits[0, -1]
        got = engine_last_logits(llm, prompt, adapter_id=adapter)
        diff = (got - expected).abs().max().item()
        assert diff <= TOL, f"{name}, prompt of {len(prompt)} tokens: max |logit diff| {diff:.3g} vs PEFT"
        # The adapter must move the logits far more than the tolerance, or parity would say nothing.
        assert (expected - base).abs().max().item() > 1000 * TOL, f"{name} barely changes the base logits"


@pytest.mark.parametrize("name", ["llama-all-r64", "llama-all-r8-dora", "qwen2-all-r32-rslora-dora"])
def test_bfloat16_adapter_weights_stay_within_their_rounding_of_peft(zoo, name):
    # `--lora-dtype bfloat16` on a float32 model: the adapter's weights round to 8 significant bits (relative
    # error <= 2^-9 each), the products and sums stay float32. The logits then move from PEFT's by a small
    # fraction of what the adapter moves them (measured: 0.26 to 0.64 %, bound 1.6 %), and by more than float32
    # rounding (so the weights really were bfloat16).
    base = ADAPTERS[name][0]
    llm = LLM(str(zoo.base(base)), max_loras=2, max_lora_rank=64, num_blocks=64, block_size=4, lora_dtype="bfloat16")
    assert llm.engine.lora is not None
    assert {w.a.dtype for layer in llm.engine.lora._wrapped for w in layer} == {torch.bfloat16}
    adapter = zoo.adapter(name)
    peft_model = peft_reference(zoo.base(base), Path(adapter))
    for prompt in TINY_PROMPTS:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            expected = peft_model(ids).logits[0, -1]
            with peft_model.disable_adapter():
                moved = (expected - peft_model(ids).logits[0, -1]).abs().max().item()
        diff = (engine_last_logits(llm, prompt, adapter_id=adapter) - expected).abs().max().item()
        assert TOL < diff <= 2**-6 * moved, f"{name}: |logit diff| {diff:.3g}, the adapter moves them {moved:.3g}"


def test_greedy_matches_peft(case):
    name, llm, peft_model, adapter, prompts = case
    outs = llm.generate(prompts, GREEDY_32, adapter_id=adapter)
    for prompt, out in zip(prompts, outs, strict=True):
        expected = hf_greedy(peft_model, prompt, 32)
        assert out.token_ids == expected, f"{name}, prompt of {len(prompt)} tokens: greedy tokens differ from PEFT"
        assert out.finish_reason == "length"
    # The base model through the engine (its parity with HF is tests/model/test_parity.py's job).
    base_outs = llm.generate(prompts, GREEDY_32)
    assert any(o.token_ids != b.token_ids for o, b in zip(outs, base_outs, strict=True)), \
        f"{name} generates the base model's tokens for every prompt"


def mixed_requests(seed: int) -> list[tuple[str | None, list[int], SamplingParams]]:
    """Every llama adapter twice and six base requests, shuffled, with random prompt and output lengths.
    One prompt is shared by a base request and two adapters, so a leak between them could not hide
    behind different inputs."""
    rng = random.Random(seed)

    def params() -> SamplingParams:
        return SamplingParams(max_new_tokens=rng.randint(3, 32), temperature=0.0, ignore_eos=True)

    def prompt() -> list[int]:
        # No token 0: hf_greedy passes pad_token_id=0, and HF masks pad tokens out of an unmasked prompt.
        return [rng.randrange(1, 512) for _ in range(rng.randint(1, 40))]

    shared = prompt()
    requests: list[tuple[str | None, list[int], SamplingParams]] = [
        (None, shared, params()), (LLAMA_ADAPTERS[0], shared, params()), (LLAMA_ADAPTERS[3], shared, params())]
    requests += [(a, prompt(), params()) for a in LLAMA_ADAPTERS + LLAMA_ADAPTERS[1:3] + LLAMA_ADAPTERS[4:]]
    requests += [(None, prompt(), params()) for _ in range(5)]
    rng.shuffle(requests)
    return requests


@pytest.mark.parametrize("max_loras", [8, 4], ids=["8-slots", "4-slots-rotating"])
def test_mixed_batch_matches_solo_runs(zoo, max_loras):
    """Base and eight adapters in one batch: each request as if it ran alone, base requests as HF.
    With four slots for eight adapters the engine must cycle adapters through the slots as requests finish.
    A small token budget chunks the long prompts, so prefill chunks share steps with other slots' decodes."""
    path = zoo.base("llama")
    llm = LLM(str(path), max_loras=max_loras, max_lora_rank=64, num_blocks=512, block_size=4,
              max_num_batched_tokens=24)
    requests = mixed_requests(seed=max_loras)
    adapter_ids = [None if a is None else zoo.adapter(a) for a, _, _ in requests]
    outs = llm.generate([p for _, p, _ in requests], [s for _, _, s in requests], adapter_id=adapter_ids)
    hf = hf_model(path)
    for (name, prompt, params), adapter, out in zip(requests, adapter_ids, outs, strict=True):
        who = f"{name or 'base'} (prompt {len(prompt)}, {params.max_new_tokens} new)"
        assert len(out.token_ids) == params.max_new_tokens, who
        if adapter is None:
            assert out.token_ids == hf_greedy(hf, prompt, params.max_new_tokens), f"{who} differs from HF base"
        else:
            solo = llm.generate([prompt], params, adapter_id=adapter)[0]
            assert out.token_ids == solo.token_ids, f"{who} differs from the same request run alone"
