"""Tests that need CUDA (`pytest -m gpu`); they skip cleanly without it. The GPU backends are also checked
on CPU through Triton's interpreter (tests/model/test_triton_decoder.py, tests/lora/test_triton_ops.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
KV = 1 << 28
"""The KV cache of the tests' engines: without it each would take 90 % of the device (several live at once)."""


def test_auto_picks_the_gpu_backends(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    from loraplex import LLM
    from tests.helpers import TINY, save_tiny

    llm = LLM(str(save_tiny(LlamaConfig(**TINY), tmp_path / "m")), max_loras=2, kv_cache_bytes=KV)
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
    outs = {b: LLM(str(base), dtype="bfloat16", attention_backend=b, kv_cache_bytes=KV).generate(prompts, params)
            for b in ("torch", "triton")}
    same = sum(a == b for x, y in zip(outs["torch"], outs["triton"], strict=True)
               for a, b in zip(x.token_ids, y.token_ids, strict=True))
    assert same >= 0.9 * 8 * 16
    first = [(x.logprobs or [])[0].logprob for x in outs["torch"]], [(y.logprobs or [])[0].logprob for y in outs["triton"]]
    assert first[0] == pytest.approx(first[1], abs=0.05)


def _graph_engines(tmp_path: Path, dtype: str, **options: object) -> tuple[object, object, list[str], Path]:
    """Two LLMs on one small model with three adapters and two device slots: CUDA graphs on and off."""
    from peft import LoraConfig
    from transformers import LlamaConfig

    from loraplex import LLM
    from tests.helpers import TINY, save_tiny
    from tests.lora.peft_fixtures import make_adapter

    base = save_tiny(LlamaConfig(**TINY), tmp_path / "m")
    adapters = [str(make_adapter(base, tmp_path / f"a{i}", LoraConfig(r=8, lora_alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]), seed=i)) for i in range(3)]
    common = dict(dtype=dtype, max_loras=2, max_lora_rank=8, max_num_seqs=32, kv_cache_bytes=KV, **options)
    graphed, eager = LLM(str(base), **common), LLM(str(base), enforce_eager=True, **common)
    return graphed, eager, adapters, base


def _waves(adapters: list[str]) -> list[tuple[list[list[int]], list[str | None]]]:
    # 24 then 5 requests whose lengths end them at different steps (batches of 24 down to 1 rows), on the
    # base model and two adapters; then a third adapter, loaded into a slot after the capture.
    prompts = [[(11 * i + j) % 500 + 1 for j in range(2 + i % 9)] for i in range(24)]
    ids = [None if i % 3 == 0 else adapters[i % 2] for i in range(24)]
    return [(prompts, ids), (prompts[:5], [adapters[2], None, adapters[2], adapters[2], None])]


def test_cuda_graphs_equal_eager_token_for_token_in_float32(tmp_path: Path) -> None:
    from loraplex import SamplingParams

    graphed, eager, adapters, _ = _graph_engines(tmp_path, "float32")
    info = graphed.engine.cuda_graphs  # type: ignore[attr-defined]
    assert info["enabled"] and info["lora"] and info["batch_sizes"][0] == 1 and info["batch_sizes"][-1] == 32
    assert eager.engine.cuda_graphs == {"enabled": False, "reason": "enforce_eager is set"}  # type: ignore[attr-defined]
    replays = []
    graphs = graphed.engine.runner.graphs  # type: ignore[attr-defined]
    original = graphs.prepare
    graphs.prepare = lambda rows: replays.append(original(rows)) or replays[-1]
    for prompts, ids in _waves(adapters):
        params = [SamplingParams(max_new_tokens=3 + (i * 5) % 17, temperature=0.0, ignore_eos=True, logprobs=1)
                  for i in range(len(prompts))]
        want = eager.generate(prompts, params, adapter_id=ids)  # type: ignore[attr-defined]
        got = graphed.generate(prompts, params, adapter_id=ids)  # type: ignore[attr-defined]
        for w, g in zip(want, got, strict=True):
            assert g.token_ids == w.token_ids
            assert [lp.logprob for lp in g.logprobs or []] == pytest.approx(
                [lp.logprob for lp in w.logprobs or []], abs=1e-3)
    steps = [s for s in replays if s is not None]
    assert len(steps) > 20 and {s.rows for s in steps} >= {1, 5, 24}


def test_cuda_graphs_in_bfloat16_within_the_stated_tolerance(tmp_path: Path) -> None:
    # A replay pads the batch, so cuBLAS may pick another kernel than the eager step's and round bfloat16
    # differently: the same tolerance as the triton/torch attention comparison above.
    from loraplex import SamplingParams

    graphed, eager, adapters, _ = _graph_engines(tmp_path, "bfloat16")
    prompts, ids = _waves(adapters)[0]
    params = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True, logprobs=1)
    want = eager.generate(prompts, params, adapter_id=ids)  # type: ignore[attr-defined]
    got = graphed.generate(prompts, params, adapter_id=ids)  # type: ignore[attr-defined]
    same = sum(a == b for w, g in zip(want, got, strict=True) for a, b in zip(w.token_ids, g.token_ids, strict=True))
    assert same >= 0.9 * 24 * 16
    # The second token is the first a graph makes (the first comes from the prefill, eager in both).
    second = [(w.logprobs or [])[1].logprob for w in want], [(g.logprobs or [])[1].logprob for g in got]
    assert second[0] == pytest.approx(second[1], abs=0.05)


def test_slot_loads_copy_from_pinned_memory_on_their_own_stream(tmp_path: Path) -> None:
    from loraplex.adapters.ref import AdapterIdentity

    graphed, _, adapters, _ = _graph_engines(tmp_path, "float32")
    manager = graphed.engine.lora  # type: ignore[attr-defined]
    weights = manager.parse(Path(adapters[0]))
    contents = weights.packed[0][0]  # layer 0's q|k|v rows, as the host tier keeps them
    assert contents.a.is_pinned() and contents.b.is_pinned()
    torch.cuda.set_sync_debug_mode("error")  # any host-device synchronization in the load raises
    try:
        slot = manager.warm(AdapterIdentity("test", adapters[0], "v"), weights)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(manager._copies) == 1  # issued, not waited for by the host
    manager.ready()
    assert not manager._copies
    torch.cuda.synchronize()
    wrapper = manager._wrapped[0][0]
    assert torch.equal(wrapper.a[slot, :contents.rank].cpu(), contents.a)
    assert torch.equal(wrapper.b[slot, :contents.rank].cpu(), contents.b)


def test_the_kv_cache_fills_what_gpu_memory_utilization_leaves(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    from loraplex import LLM
    from loraplex.kv.block_pool import KVCache
    from tests.helpers import TINY, save_tiny

    llm = LLM(str(save_tiny(LlamaConfig(**TINY), tmp_path / "m")), gpu_memory_utilization=0.3, max_loras=2)
    engine = llm.engine
    cfg = engine.runner.model.config
    kv_bytes = engine.pool.num_blocks * KVCache.bytes_per_block(cfg.num_layers, engine.kv_cache.block_size,
                                                                cfg.num_kv_heads, cfg.head_dim, torch.bfloat16)
    _, total = torch.cuda.mem_get_info()
    # The cache took most of the 30 % (the tiny model's weights and activations are megabytes; the CUDA
    # context and what earlier tests of this process still hold count as used).
    assert 0.2 * total < kv_bytes <= 0.3 * total


def test_fp8_quantized_model_generates_near_the_bfloat16_one(tmp_path: Path) -> None:
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9+")
    from transformers import LlamaConfig

    from loraplex import LLM, SamplingParams
    from tests.helpers import TINY, save_tiny

    base = str(save_tiny(LlamaConfig(**TINY), tmp_path / "m"))
    prompts = [[(3 * i + j) % 500 + 1 for j in range(24)] for i in range(4)]
    params = SamplingParams(max_new_tokens=1, prompt_logprobs=True)
    bf16 = LLM(base, kv_cache_bytes=KV).generate(prompts, params)
    fp8_llm = LLM(base, quantize="fp8", kv_cache_bytes=KV)
    assert fp8_llm.engine.weight_bytes.get("float8_e4m3fn", 0) > 0
    fp8 = fp8_llm.generate(prompts, params)
    diff = torch.tensor([out.prompt_logprobs[1:] for out in fp8]) - torch.tensor([out.prompt_logprobs[1:] for out in bf16])
    # The CPU test (tests/model/test_quant.py) checks the math against its reference; here the CUDA kernel runs,
    # within what fp8 rounding does to this tiny model on CPU (mean 0.15 nats) plus bfloat16's.
    assert diff.abs().mean() < 0.3


def test_int4_model_with_adapters_on_cuda_computes_as_its_dequantized_float_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from loraplex.model import quant
    from loraplex.model.triton_quant import int4_linear_triton
    from tests.model.test_quant_int4 import check_int4_model_against_its_dequantized_twin

    calls = []

    def spy(*args: object) -> torch.Tensor:
        calls.append(1)
        return int4_linear_triton(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(quant, "_triton_ops", lambda: SimpleNamespace(int4_linear_triton=spy))
    check_int4_model_against_its_dequantized_twin(tmp_path, "cuda", kv_cache_bytes=KV)
    assert calls  # the layers ran the Triton kernel (in eager steps and in the CUDA graphs' capture)


def test_weight_only_int8_on_cuda_generates_near_the_bfloat16_model(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    from loraplex import LLM, SamplingParams
    from loraplex.model.layers import PackedLinear
    from loraplex.model.quant import Int8ChannelWeight
    from tests.helpers import TINY, save_tiny

    base = str(save_tiny(LlamaConfig(**TINY), tmp_path / "m"))
    prompts = [[(3 * i + j) % 500 + 1 for j in range(24)] for i in range(4)]
    params = SamplingParams(max_new_tokens=1, prompt_logprobs=True)
    bf16 = LLM(base, kv_cache_bytes=KV).generate(prompts, params)
    llm = LLM(base, quantize="int8", kv_cache_bytes=KV)
    layers = [m for m in llm.engine.runner.model.modules() if isinstance(m, PackedLinear)]
    assert layers and all(isinstance(m.quantized, Int8ChannelWeight) for m in layers)
    int8 = llm.generate(prompts, params)
    diff = torch.tensor([o.prompt_logprobs[1:] for o in int8]) - torch.tensor([o.prompt_logprobs[1:] for o in bf16])
    # Weight-only int8 moved this tiny model's prompt logprobs by 0.035 nats on average in float32 on CPU (its
    # torch path); bfloat16's own rounding comes on top.
    assert diff.abs().mean() < 0.15


def test_an_int4_load_on_cuda_never_holds_the_float_linears(tmp_path: Path) -> None:
    """Each layer is quantized as its tensors arrive: the device's peak while loading is the 4-bit model and a
    layer or two in float, not the bfloat16 model (tests/model/test_loader.py checks the host's on CPU)."""
    from transformers import LlamaConfig

    from loraplex.model.loader import build_model, open_checkpoint
    from tests.helpers import TINY, save_tiny

    config = dict(TINY, hidden_size=512, intermediate_size=2048, num_hidden_layers=16, num_attention_heads=8,
                  num_key_value_heads=2, initializer_range=0.02)
    base = save_tiny(LlamaConfig(**config), tmp_path / "m")
    peak = {}
    for quantize in ("none", "int4"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        model = build_model(open_checkpoint(base, keep_int4=True), torch.bfloat16, torch.device("cuda"), 512, "aten",
                            quantize)
        peak[quantize] = torch.cuda.max_memory_allocated() - before
        del model
    linear_bytes = 2 * 16 * (512 * (512 + 2 * 128) + 512 * 512 + 3 * 512 * 2048)
    assert peak["none"] >= linear_bytes
    assert peak["int4"] < 0.5 * linear_bytes, (peak, linear_bytes)


def test_speculative_decoding_on_cuda_gives_the_outputs_of_plain_decoding(tmp_path: Path) -> None:
    """Drafts verified through the Triton prefill attention and LoRA kernels, beside graph-replayed plain
    decode steps (speculation on at small batches only): greedy float32 outputs identical, every KV block
    back. The drafts come from a run without speculation, a third of them corrupted."""
    import random

    from loraplex import LLM, SamplingParams
    from tests.engine.test_speculative import OracleDrafter

    graphed, _, adapters, base = _graph_engines(tmp_path, "float32")
    spec = LLM(str(base), dtype="float32", max_loras=2, max_lora_rank=8, max_num_seqs=32, kv_cache_bytes=KV,
               speculative_tokens=4, speculative_max_batch=6)
    for prompts, ids in _waves(adapters):
        params = [SamplingParams(max_new_tokens=3 + (i * 5) % 17, temperature=0.0, ignore_eos=True)
                  for i in range(len(prompts))]
        want = graphed.generate(prompts, params, adapter_id=ids)  # type: ignore[attr-defined]
        drafter = OracleDrafter({}, corrupt=0.3, seed=random.randrange(100))
        spec.engine.drafter = spec.engine.scheduler.drafter = drafter  # type: ignore[assignment]
        engine, got = spec.engine, {}
        for i, (p, s, a) in enumerate(zip(prompts, params, ids, strict=True)):
            drafter.expected[f"q{i}"] = want[i].token_ids
            engine.add_request(f"q{i}", p, s, adapter_id=a)
        engine.wait_for_adapter_loads()
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    got[out.request_id] = out.token_ids
        assert [got[f"q{i}"] for i in range(len(prompts))] == [w.token_ids for w in want]
    assert spec.engine.accepted_tokens > 0 and spec.engine.pool.num_free == spec.engine.pool.num_blocks


def test_async_scheduling_on_cuda_gives_the_outputs_of_waiting_steps(tmp_path: Path) -> None:
    """Steps queued before the last step's tokens are read (their inputs take the tokens on the device, graph
    replays and eager steps), greedy and seeded sampled requests, some ending at a stop token found a step
    late: float32 tokens identical to an engine whose every step waits (async scheduling off, eager)."""
    from dataclasses import replace

    from loraplex import SamplingParams

    graphed, eager, adapters, _ = _graph_engines(tmp_path, "float32")
    engine = graphed.engine  # type: ignore[attr-defined]
    assert engine.async_scheduling  # `auto` on CUDA
    eager.engine.async_scheduling = False  # type: ignore[attr-defined]
    launches = []
    launch = engine.runner.launch
    engine.runner.launch = lambda sched, fed, *a: launches.append(fed is not None) or launch(sched, fed, *a)
    for prompts, ids in _waves(adapters):
        params = [SamplingParams(max_new_tokens=3 + (i * 5) % 17, ignore_eos=True, seed=i,
                                 temperature=0.0 if i % 2 else 0.8, top_k=0 if i % 2 else 40)
                  for i in range(len(prompts))]
        want = eager.generate(prompts, params, adapter_id=ids)  # type: ignore[attr-defined]
        params = [replace(p, stop_token_ids=[w.token_ids[len(w.token_ids) // 2]]) if i % 4 == 0 else p
                  for i, (p, w) in enumerate(zip(params, want, strict=True))]
        want = eager.generate(prompts, params, adapter_id=ids)  # type: ignore[attr-defined]
        got = graphed.generate(prompts, params, adapter_id=ids)  # type: ignore[attr-defined]
        assert [g.token_ids for g in got] == [w.token_ids for w in want]
        assert [g.finish_reason for g in got] == [w.finish_reason for w in want]
    assert sum(launches) > 20  # steps fed by the queued step's tokens
    assert engine.pool.num_free == engine.pool.num_blocks


def test_small_uploads_do_not_wait_for_queued_kernels() -> None:
    """`to_device` (the sampler's and LoRA batch's per-step index tensors) returns while a long kernel is still
    queued before its copy, and the values arrive."""
    import time

    from loraplex.device import to_device

    values = torch.arange(1000)
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU time queued (clock cycles)
    start = time.perf_counter()
    out = to_device(values, "cuda")
    returned = time.perf_counter() - start
    values.zero_()  # the caller may reuse its tensor at once
    start = time.perf_counter()
    torch.cuda.synchronize()
    still_running = time.perf_counter() - start
    assert returned < 0.1 and still_running > 0.3, (returned, still_running)
    assert torch.equal(out.cpu(), torch.arange(1000))
