"""The GPU backends end to end through the engine: the Triton paged attention (and the Triton LoRA op) in
the decoder give the torch path's outputs, on CPU through Triton's interpreter (on CUDA when present);
and `auto` picks them on CUDA only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# As in test_triton_attention: the interpreter must be on before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
pytest.importorskip("triton")

from peft import LoraConfig  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from loraplex import LLM, SamplingParams  # noqa: E402
from loraplex.lora import ops as lora_ops  # noqa: E402
from loraplex.model.attention import paged_attention, resolve_attention_backend  # noqa: E402
from loraplex.model.decoder import Attention  # noqa: E402
from loraplex.model.triton_attention import paged_attention_triton  # noqa: E402
from tests.helpers import save_tiny  # noqa: E402
from tests.lora.peft_fixtures import make_adapter  # noqa: E402
from tests.triton_interpreter import SKIP_REASON, kernels_runnable, run_in_fresh_process  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(not kernels_runnable(), reason=SKIP_REASON)
# Small enough for the interpreter: two layers, 4 heads over 2 KV heads (GQA), 16-wide heads.
SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.15)


@needs_kernels
def test_triton_attention_and_lora_in_the_decoder_equal_the_torch_path(tmp_path: Path) -> None:
    base = save_tiny(LlamaConfig(**SMALL), tmp_path / "base")
    adapters = [str(make_adapter(base, tmp_path / f"a{i}", LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "v_proj", "down_proj"]), seed=i)) for i in range(2)]
    # Decodes and prefills in one step (chunked prompts of several blocks), a shared prefix from the cache.
    prompts = [[(7 * i + j) % 250 + 1 for j in range(n)] for i, n in enumerate([3, 21, 9, 40])]
    prompts.append(prompts[1][:16] + [5, 6, 7])
    ids = [None, adapters[0], adapters[1], adapters[0], None]
    params = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True, logprobs=1)
    results = {}
    for attention, lora in (("torch", "torch"), ("triton", "triton")):
        llm = LLM(str(base), device=DEVICE, block_size=4, num_blocks=64, max_num_batched_tokens=24,
                  max_loras=2, max_lora_rank=8, attention_backend=attention, lora_backend=lora)
        assert llm.engine.attention_backend == attention and llm.engine.lora is not None
        assert llm.engine.lora.backend == lora
        attends = {m.attend for m in llm.engine.runner.model.modules() if isinstance(m, Attention)}
        assert attends == {paged_attention_triton if attention == "triton" else paged_attention}
        results[attention] = llm.generate(prompts, params, adapter_id=ids)
    for want, got in zip(results["torch"], results["triton"], strict=True):
        assert got.token_ids == want.token_ids
        assert [lp.logprob for lp in got.logprobs or []] == pytest.approx(
            [lp.logprob for lp in want.logprobs or []], abs=1e-4)


def test_auto_picks_the_triton_backends_on_cuda_only(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_attention_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_attention_backend("auto", torch.device("cuda")) == "triton"
    assert resolve_attention_backend("torch", torch.device("cuda")) == "torch"
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        resolve_attention_backend("flash", torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the triton LoRA op's own check
    assert lora_ops.resolve_lora_backend("auto", torch.device("cuda")) == "triton"
    assert lora_ops.resolve_lora_backend("auto", torch.device("cpu")) in ("native", "torch")


def test_in_fresh_process() -> None:
    if kernels_runnable():
        pytest.skip("the kernels run in this process")
    run_in_fresh_process(__file__, "equal_the_torch_path")
