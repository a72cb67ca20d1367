"""Tests that need CUDA (`pytest -m gpu`); they skip cleanly without it. The GPU backends are also checked
on CPU through Triton's interpreter (tests/model/test_triton_decoder.py, tests/lora/test_triton_ops.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_auto_picks_the_gpu_backends(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    from loraplex import LLM
    from tests.helpers import TINY, save_tiny

    llm = LLM(str(save_tiny(LlamaConfig(**TINY), tmp_path / "m")), max_loras=2)
    engine = llm.engine
    assert (engine.attention_backend, engine.lora.backend if engine.lora else None) == ("triton", "triton")


def test_fp32_mixed_batch_equals_peft_token_for_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # bench.gpu's parity check on a mid-sized model: 8 requests over 4 adapters and the base model.
    from loraplex.bench import gpu

    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path))
    config = {**gpu.MODEL_1B, "hidden_size": 512, "intermediate_size": 1024, "num_attention_heads": 8,
              "num_key_value_heads": 2, "vocab_size": 4096}
    equal, total, changed = gpu.fp32_parity(config, tmp_path, "cuda")
    assert equal == total and changed > 0


def test_triton_attention_equals_torch_in_the_decoder_in_bfloat16(tmp_path: Path) -> None:
    # bfloat16 keeps 8 significant bits: the two paths round differently, so the stated tolerance is on
    # logprobs (0.05 nats) and on the share of equal greedy tokens over 8 x 16 tokens (at least 90 %).
    from transformers import LlamaConfig

    from loraplex import LLM, SamplingParams
    from tests.helpers import TINY, save_tiny

    base = save_tiny(LlamaConfig(**TINY), tmp_path / "m")
    prompts = [[(5 * i + j) % 500 + 1 for j in range(3 + 7 * i)] for i in range(8)]
    params = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True, logprobs=1)
    outs = {b: LLM(str(base), dtype="bfloat16", attention_backend=b).generate(prompts, params)
            for b in ("torch", "triton")}
    same = sum(a == b for x, y in zip(outs["torch"], outs["triton"], strict=True)
               for a, b in zip(x.token_ids, y.token_ids, strict=True))
    assert same >= 0.9 * 8 * 16
    first = [(x.logprobs or [])[0].logprob for x in outs["torch"]], [(y.logprobs or [])[0].logprob for y in outs["triton"]]
    assert first[0] == pytest.approx(first[1], abs=0.05)
