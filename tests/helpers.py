"""Shared test helpers: tiny random checkpoints saved as HF folders, and direct access to engine logits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from loraplex import LLM

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.15)


def save_tiny(config: PretrainedConfig, path: Path, seed: int = 0) -> Path:
    """Random-weight HF model for `config`, saved as safetensors. Norm weights get noise too, so a
    norm offset or a skipped norm would show."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1)
    model.generation_config.eos_token_id = None
    model.save_pretrained(path)
    return path


def hf_model(path: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def engine_last_logits(llm: LLM, prompt: list[int], adapter_id: str | None = None, **request: Any) -> torch.Tensor:
    """Last-position logits of one prefill through the engine's real path (scheduler, runner, paged KV,
    LoRA slots), with `adapter_id` applied when given."""
    from loraplex import SamplingParams

    engine = llm.engine
    engine.add_request("logits-probe", prompt, SamplingParams(max_new_tokens=1), adapter_id=adapter_id, **request)
    try:
        engine.wait_for_adapter_loads()
        inputs = engine.runner.prepare(engine.scheduler.schedule())
        logits = engine.runner.forward(inputs)
    finally:
        engine.abort("logits-probe")
    assert logits is not None and logits.shape[0] == 1
    return logits[0]
