"""`--quantize int4` (loraplex/model/quant.py): weight-only 4-bit groups of 32 inputs, each on the grid from its
minimum to its maximum. The quantizer against a scalar reference and against gguf's own Q4_1 blocks (a
weight already on such a grid comes back exactly), the C decoder against Int4Weight.dense's bits, and a
quantized model with adapters in a mixed batch against the dequantized float model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, dequantize, quantize
from transformers import LlamaConfig

from loraplex import LLM
from loraplex.config import ModelConfig
from loraplex.model.layers import PackedLinear
from loraplex.model.quant import INT4_GROUP, Int4Weight, _kernels, int4_linear, quantize_int4, weight_bytes
from tests.helpers import TINY, save_tiny
from tests.model.test_quant import mixed_batch


def test_the_quantizer_puts_each_weight_on_its_groups_nearest_level() -> None:
    # Element by element, in float64: group (c, g) of inputs 32g..32g+31 of output c has the levels
    # low + i * (high - low) / 15, i = 0..15; q is the nearest level's i; input 2j sits in byte j's low nibble.
    w = torch.randn(96, 5, generator=torch.Generator().manual_seed(0))  # [in, out]
    q = quantize_int4(w)
    assert q.packed.shape == (5, 48) and q.scale.shape == q.offset.shape == (5, 3) and q.group == INT4_GROUP
    for c in range(5):
        for g in range(3):
            group = [float(w[k, c]) for k in range(32 * g, 32 * g + 32)]
            low, high = min(group), max(group)
            step = (high - low) / 15
            assert float(q.offset[c, g]) == low and float(q.scale[c, g]) == pytest.approx(step, rel=1e-6)
            for i, v in enumerate(group):
                k = 32 * g + i
                byte = int(q.packed[c, k // 2])
                level = byte & 15 if k % 2 == 0 else byte >> 4
                assert abs(level - (v - low) / step) <= 0.5 + 1e-4
                assert float(q.dense()[c, k]) == pytest.approx(low + level * step, abs=1e-6)
    assert torch.equal(q.dense_t(), q.dense().t())


def test_weights_on_gguf_q4_1_blocks_come_back_exactly() -> None:
    # gguf's own Q4_1 quantizer and decoder (llama.cpp's format: 32 inputs a block, a float16 scale and minimum,
    # the same block layout along the input): its decoded weight is already on a 4-bit grid per block of 32,
    # which the int4 quantizer finds again bit for bit (the demo model's GGUF linears are Q4_1).
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 128)).astype(np.float32)  # [out, in], GGUF's row order
    blocks = dequantize(quantize(w, GGMLQuantizationType.Q4_1), GGMLQuantizationType.Q4_1)
    on_grid = torch.from_numpy(np.ascontiguousarray(blocks))
    assert not torch.equal(on_grid, torch.from_numpy(w))
    assert torch.equal(quantize_int4(on_grid.t()).dense(), on_grid)


@pytest.mark.parametrize(("rows", "k", "n"), [(1, 64, 96), (32, 576, 3072), (7, 1536, 40), (8, 576, 960),
                                              (9, 576, 960)])
def test_int4_layers_multiply_the_decoded_weight(rows: int, k: int, n: int) -> None:
    # Up to INT4_FUSED_ROWS (8) rows the fused C kernel, above it the decoded weight through oneDNN.
    g = torch.Generator().manual_seed(rows)
    q = quantize_int4(torch.randn(k, n, generator=g))
    x, b = torch.randn(rows, k, generator=g), torch.randn(n, generator=g)
    want = torch.nn.functional.linear(x.double(), q.dense().double(), b.double())
    assert (int4_linear(x, q, b).double() - want).abs().max() < 1e-4 * want.abs().max()
    if _kernels() is None:
        pytest.skip("no C compiler: the layer decodes with Int4Weight.dense itself")
    decoded = torch.empty(n, k)
    _kernels().int4_decode(q.packed.data_ptr(), n, k, q.scale.data_ptr(), q.offset.data_ptr(), q.group, decoded.data_ptr())
    assert torch.equal(decoded, q.dense())


def test_without_a_compiler_int4_layers_decode_with_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler-anywhere")
    _kernels.cache_clear()
    try:
        assert _kernels() is None
        q = quantize_int4(torch.randn(64, 24))
        x = torch.randn(3, 64)
        assert torch.equal(int4_linear(x, q, None), torch.nn.functional.linear(x, q.dense()))
    finally:
        _kernels.cache_clear()


def test_int4_is_a_setting_for_every_device() -> None:
    assert ModelConfig(quantize="int4", device="cpu").resolved_quantize() == "int4"
    assert ModelConfig(quantize="int4", device="cpu", dtype="bfloat16").resolved_quantize() == "int4"
    with pytest.raises(ValueError, match="quantize must be one of none, int8, int4, fp8, got 'int3'"):
        ModelConfig(quantize="int3")


def test_an_int4_model_with_adapters_in_a_mixed_batch_computes_as_its_dequantized_float_model(tmp_path: Path) -> None:
    check_int4_model_against_its_dequantized_twin(tmp_path, "cpu")


def check_int4_model_against_its_dequantized_twin(tmp_path: Path, device: str, **options: object) -> None:
    """An int4 model with adapters in a mixed batch on `device` (float32) computes as the same model with each
    int4 layer's decoded weight in float (tests/gpu/test_cuda.py runs it on CUDA, through the Triton kernel)."""
    # intermediate 80: the down projections' input is no multiple of 32, so they stay in float, as the LM head does.
    base = save_tiny(LlamaConfig(**{**TINY, "intermediate_size": 80}), tmp_path / "base")
    logprobs = mixed_batch(base, tmp_path, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"],
                           ["q_proj", "up_proj"])
    options = dict(device=device, dtype="float32", max_loras=2, max_lora_rank=8, **options)
    float_model = logprobs(LLM(str(base), **options))
    llm = LLM(str(base), quantize="int4", **options)
    model = llm.engine.runner.model
    layers = {name: m for name, m in model.named_modules() if isinstance(m, PackedLinear)}
    int4_layers = [m for m in layers.values() if isinstance(m.quantized, Int4Weight)]
    kept = {name.removesuffix(".base").rsplit(".", 1)[-1] for name, m in layers.items() if m.quantized is None}
    assert kept == {"lm_head", "down_proj"}
    assert len(int4_layers) == 3 * TINY["num_hidden_layers"]  # qkv, o, gate_up of each layer
    assert llm.engine.weight_bytes["uint8"] == sum(m.in_features * sum(m.shard_sizes) // 2 for m in int4_layers)
    int4 = logprobs(llm)
    for m in int4_layers:  # the same model with each int4 layer's decoded weight in float
        m.weight_t, m.quantized = m.quantized.dense_t().contiguous(), None  # type: ignore[union-attr]
    dequantized = logprobs(llm)
    assert (int4 - dequantized).abs().max() < 1e-3  # float rounding only (another GEMM's summation order)
    # 4-bit weights move this random tiny model's log-probabilities by 0.41 nats on average (measured; its
    # groups of 32 random weights are far from any 4-bit grid, while the demo model's Q4_1 linears lose
    # nothing, docs/benchmarks.md), and the adapters act on them as on the float model's.
    assert 0.2 < (int4 - float_model).abs().mean() < 0.6
    for row in (1, 2):
        assert (float_model[row] - float_model[0]).abs().max() > 1
        assert ((int4[row] - int4[0]) - (dequantized[row] - dequantized[0])).abs().max() < 1e-3


def test_weight_bytes_count_an_int4_layers_nibbles_and_groups() -> None:
    layer = PackedLinear(64, [32, 16], bias=False)
    layer.weight.data = torch.randn(48, 64)
    layer.finalize("aten")
    layer.use_quantized(quantize_int4(layer.dense_t()))
    assert weight_bytes(torch.nn.Sequential(layer)) == {"uint8": 48 * 32, "float32": 2 * 48 * 2 * 4}
