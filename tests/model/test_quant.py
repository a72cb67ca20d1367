"""`--quantize int8` (loraplex/model/quant.py): the C row kernels give the torch reference's bits, the
reference computes the scheme's formula, quantized weights dequantize to the float ones within their
rounding, and a quantized model's outputs, with and without adapters (LoRA and DoRA) in one mixed batch,
stay within a stated tolerance of the float model's and of the dequantized model's."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from transformers import LlamaConfig

from loraplex import LLM, SamplingParams
from loraplex.config import ModelConfig
from loraplex.model.layers import PackedLinear
from loraplex.model.quant import (
    FP8_MAX,
    Fp8Weight,
    Int8Weight,
    _kernels,
    fp8_linear,
    int8_linear,
    int8_linear_torch,
    quantize_fp8,
    quantize_int8,
    quantize_int8_channel,
    quantize_model,
    weight_bytes,
)
from tests.helpers import TINY, save_tiny
from tests.lora.peft_fixtures import make_adapter


def _layer(k: int, n: int, seed: int = 0) -> tuple[torch.Tensor, Int8Weight]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(k, n, generator=g)
    smooth = torch.rand(k, generator=g) + 0.5
    return w, quantize_int8(w, smooth, torch.tensor([1, k // 2, k - 1]))


@pytest.mark.parametrize(("rows", "k", "n", "bias"), [(1, 64, 96, False), (32, 576, 3072, True), (300, 128, 40, True)])
def test_the_c_kernels_give_the_torch_references_bits(rows: int, k: int, n: int, bias: bool) -> None:
    if _kernels() is None:
        pytest.skip("no C compiler: int8_linear runs the torch reference itself")
    w, q = _layer(k, n)
    wide = torch.randn(rows, k + 7) * 3  # rows with a stride of their own
    wide[:, 3] *= 50  # an outlier channel that is not one of the float ones
    wide[rows // 2, 2] = float("nan")  # a NaN row comes out NaN on both paths
    x = wide[:, :k]
    b = torch.randn(n) if bias else None
    got, want = int8_linear(x, q, b), int8_linear_torch(x, q, b)
    assert torch.equal(got.isnan(), want.isnan()) and got[rows // 2].isnan().all()
    assert torch.equal(got.nan_to_num(), want.nan_to_num())


def test_the_reference_computes_the_schemes_formula() -> None:
    # y[r, c] = Σ_j round(x[r, j] / s_j / a_r) · q[j, c] · a_r · w_c + b_c + Σ_k x[r, o_k] · W[o_k, c], with
    # a_r = max_j |x[r, j] / s_j| / 127 over the non-outlier channels j (float64, one element at a time).
    w, q = _layer(12, 5, seed=3)
    x = torch.randn(3, 12) * 2
    b = torch.randn(5)
    got = int8_linear_torch(x, q, b)
    outliers = set(q.outliers.tolist())
    for r in range(3):
        v = [0.0 if j in outliers else float(x[r, j]) * float(q.inv_smooth[j]) for j in range(12)]
        a = max(abs(t) for t in v) / 127
        for c in range(5):
            want = sum(round(v[j] / a) * int(q.weight[j, c]) for j in range(12)) * a * float(q.scale[c]) + float(b[c])
            want += sum(float(x[r, o]) * float(w[o, c]) for o in outliers)
            assert float(got[r, c]) == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_quantized_weights_dequantize_within_their_rounding() -> None:
    w, q = _layer(64, 48, seed=1)
    dense = q.dense_t()
    assert torch.equal(dense[q.outliers], w[q.outliers])  # the float channels are exact
    smooth = 1 / q.inv_smooth
    # Each other element is off by at most half its column's step, scaled back by its row's smoothing.
    bound = (q.scale[None, :] / 2) / smooth[:, None] * (1 + 1e-5)
    assert ((dense - w).abs() <= bound + 1e-7).all()
    assert q.weight.dtype == torch.int8 and (q.weight[q.outliers] == 0).all()


def test_int8_on_the_cpu_needs_float32_and_runs_anywhere_else() -> None:
    assert ModelConfig(quantize="int8", device="cpu").resolved_quantize() == "int8"
    with pytest.raises(ValueError, match="quantize must be one of none, int8, int4, fp8, got 'int3'"):
        ModelConfig(quantize="int3")
    with pytest.raises(ValueError, match="quantize 'int8' on the CPU runs in float32"):
        ModelConfig(quantize="int8", device="cpu", dtype="bfloat16").resolved_quantize()
    assert ModelConfig(quantize="int8", device="cuda").resolved_quantize() == "int8"  # weight-only there


def test_weight_only_int8_rounds_each_output_channel_to_its_own_scale() -> None:
    # The GPU scheme of `--quantize int8` (its Triton kernel: tests/model/test_triton_quant.py); the torch path
    # here is its reference and what other devices run.
    gen = torch.Generator().manual_seed(0)
    weight_t = torch.randn(96, 40, generator=gen) * torch.linspace(0.1, 3, 40)  # [in, out]: channels of any size
    w = quantize_int8_channel(weight_t)
    assert w.weight.dtype == torch.int8 and w.weight.shape == (40, 96) and w.scale.shape == (40,)
    assert torch.equal(w.weight.abs().amax(dim=1), torch.full((40,), 127, dtype=torch.int8))
    error = (w.dense_t() - weight_t).abs()
    assert (error <= w.scale / 2 * (1 + 1e-6)).all()  # to nearest on each channel's grid
    x = torch.randn(5, 96, generator=gen)
    torch.testing.assert_close(w.linear(x, None), x @ w.dense_t())


def _dequantized(llm: LLM) -> None:
    """Swap every int8 layer of `llm`'s model for its dequantized float weight (activations then stay float)."""
    for module in llm.engine.runner.model.modules():
        if isinstance(module, PackedLinear) and module.quantized is not None:
            module.weight_t, module.quantized = module.quantized.dense_t(), None


def mixed_batch(base: Path, tmp_path: Path, lora: list[str], dora: list[str]) -> Callable[[LLM], torch.Tensor]:
    """The prompt log-probabilities [6, 23] an engine gives a mixed batch of 6 requests: base, a LoRA on
    `lora`, a DoRA on `dora`, the LoRA, base, the DoRA."""
    adapters = [str(make_adapter(base, tmp_path / "lora", LoraConfig(r=8, lora_alpha=16, target_modules=lora),
                                 seed=1)),
                str(make_adapter(base, tmp_path / "dora", LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                                      target_modules=dora), seed=2))]
    prompts = [[(13 * i + j) % 500 + 1 for j in range(24)] for i in range(6)]
    ids = [None, adapters[0], adapters[1], adapters[0], None, adapters[1]]
    params = SamplingParams(max_new_tokens=1, prompt_logprobs=True)

    def logprobs(llm: LLM) -> torch.Tensor:
        outs = llm.generate(prompts, params, adapter_id=ids)
        return torch.tensor([out.prompt_logprobs[1:] for out in outs])

    return logprobs


def test_a_quantized_model_with_adapters_in_a_mixed_batch_stays_near_the_float_one(tmp_path: Path) -> None:
    base = save_tiny(LlamaConfig(**TINY), tmp_path / "base")
    logprobs = mixed_batch(base, tmp_path, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"], ["q_proj", "down_proj"])
    options = dict(device="cpu", max_loras=2, max_lora_rank=8)
    float_model = logprobs(LLM(str(base), **options))
    quantized = LLM(str(base), quantize="int8", **options)
    assert quantized.engine.quantize == "int8"
    assert quantized.engine.weight_bytes["int8"] >= sum(
        m.in_features * sum(m.shard_sizes) for m in quantized.engine.runner.model.modules() if isinstance(m, PackedLinear))
    int8 = logprobs(quantized)
    _dequantized(quantized)
    dequantized = logprobs(quantized)
    # Stated tolerances, measured on this random tiny model (hidden 64: each int8 row rounds 64 channels to one
    # scale, far coarser than a real model's thousands): int8 activations move its log-probabilities by at most
    # 0.15 nats (mean 0.034) from the dequantized model, and int8 weights and activations together by at most
    # 0.23 (mean 0.042) from the float model, adapters or not. The bounds leave ~1.5x room.
    assert (int8 - dequantized).abs().max() < 0.25 and (int8 - dequantized).abs().mean() < 0.05
    assert (int8 - float_model).abs().max() < 0.35 and (int8 - float_model).abs().mean() < 0.065
    # And the adapters act on the quantized base as on the float one: they move its log-probabilities by up
    # to ~4 nats, and by the same amounts to within 0.16 (bound 0.25).
    for row in (1, 2):
        float_shift = float_model[row] - float_model[0]
        int8_shift = int8[row] - int8[0]
        assert float_shift.abs().max() > 2
        assert (int8_shift - float_shift).abs().max() < 0.25


def test_weight_bytes_count_what_each_layer_stores() -> None:
    layer = PackedLinear(64, [32, 16], bias=True)
    layer.weight.data = torch.randn(48, 64)
    layer.bias.data = torch.zeros(48)  # type: ignore[union-attr]
    layer.finalize("aten")
    model = torch.nn.Sequential(layer)
    assert weight_bytes(model) == {"float32": 64 * 48 * 4 + 48 * 4}
    layer.use_quantized(quantize_int8(layer.dense_t(), torch.ones(64), torch.tensor([0, 5])))
    sizes = weight_bytes(model)
    assert sizes["int8"] == 64 * 48 and sizes["float32"] == 48 * 4 + 48 * 4 + 64 * 4 + 2 * 48 * 4


def test_without_a_compiler_int8_layers_run_the_torch_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler-anywhere")
    _kernels.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="loraplex.model.quant"):
            assert _kernels() is None
        assert "no C compiler" in caplog.text and "torch ops (slower)" in caplog.text
        w, q = _layer(64, 32)
        x = torch.randn(5, 64)
        assert torch.equal(int8_linear(x, q, None), int8_linear_torch(x, q, None))
    finally:
        _kernels.cache_clear()


def test_fp8_layers_compute_the_schemes_formula() -> None:
    # y[r, c] = Σ_j e4m3(x[r, j] / a_r) · e4m3(W[j, c] / w_c) · a_r · w_c + b_c, with a_r = max_j |x[r, j]| / 448
    # and w_c = max_j |W[j, c]| / 448 (float64 from the rounded values).
    g = torch.Generator().manual_seed(5)
    w, x, b = torch.randn(32, 16, generator=g), torch.randn(3, 32, generator=g) * 4, torch.randn(16, generator=g)
    q = quantize_fp8(w)
    got = fp8_linear(x, q, b)
    a = x.abs().amax(dim=1, keepdim=True) / FP8_MAX
    xq = (x / a).to(torch.float8_e4m3fn).double()
    want = (xq * a.double()) @ (q.weight.double() * q.scale.double().t()).t() + b.double()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # The weight dequantizes within e4m3's rounding (3 mantissa bits: half a step is 1/16 of the value).
    assert ((q.dense_t() - w).abs() <= w.abs() / 16 + q.scale.t().t() * 2 ** -9).all()


def test_fp8_needs_a_gpu_with_fp8(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="quantize 'fp8' runs on CUDA GPUs with fp8 tensor cores .* use 'int8'"):
        ModelConfig(quantize="fp8", device="cpu").resolved_quantize()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ValueError, match="needs compute capability 8.9 or newer .* NVIDIA A100 has 8.0"):
        ModelConfig(quantize="fp8", device="cuda").resolved_quantize()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert ModelConfig(quantize="fp8", device="cuda").resolved_quantize() == "fp8"


def test_an_fp8_model_with_adapters_in_a_mixed_batch_computes_as_its_reference(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # On CPU through torch's fp8 matmul (slow there, so the engine refuses fp8 off CUDA; the math is the same).
    # The reference model multiplies every layer in float64 from the same rounded operands (the formula of
    # test_fp8_layers_compute_the_schemes_formula); adapters add their deltas on top in both.
    base = save_tiny(LlamaConfig(**TINY), tmp_path / "base")
    adapter = str(make_adapter(base, tmp_path / "lora", LoraConfig(r=8, lora_alpha=16, target_modules=[
        "q_proj", "v_proj", "down_proj"]), seed=1))
    prompts = [[(13 * i + j) % 500 + 1 for j in range(24)] for i in range(4)]
    ids = [None, adapter, None, adapter]
    params = SamplingParams(max_new_tokens=1, prompt_logprobs=True)

    def logprobs(llm: LLM) -> torch.Tensor:
        return torch.tensor([out.prompt_logprobs[1:] for out in llm.generate(prompts, params, adapter_id=ids)])

    llm = LLM(str(base), device="cpu", max_loras=1, max_lora_rank=8)
    float_model = logprobs(llm)
    quantize_model(llm.engine.runner.model, "fp8", None)
    fp8 = logprobs(llm)

    def reference(self: Fp8Weight, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        a = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
        xq = (x / a).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).double() * a.double()
        y = xq @ (self.weight.double() * self.scale.double().t()).t()
        return (y if bias is None else y + bias.double()).float()

    monkeypatch.setattr(Fp8Weight, "linear", reference)
    want = logprobs(llm)
    assert (fp8 - want).abs().max() < 1e-3
    assert (fp8[1] - fp8[0]).abs().max() > 1  # the adapter acts
    # And against the float model: fp8's rounding (3 mantissa bits) moves this tiny random model's
    # log-probabilities by 0.15 nats on average (the demo model's perplexity: +2.7 %, docs/benchmarks.md).
    assert 0.01 < (fp8 - float_model).abs().mean() < 0.3


def test_fp8_leaves_layers_whose_dimensions_cuda_cannot_take_in_float(tmp_path: Path) -> None:
    # A vocabulary of 500 (not a multiple of 16): the LM head stays float, every other layer is fp8.
    base = save_tiny(LlamaConfig(**{**TINY, "vocab_size": 500}), tmp_path / "base")
    model = LLM(str(base), device="cpu").engine.runner.model
    quantize_model(model, "fp8", None)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, PackedLinear)}
    assert layers["lm_head"].quantized is None
    assert all(isinstance(m.quantized, Fp8Weight) for name, m in layers.items() if name != "lm_head")


def test_int8_smooths_and_sets_apart_the_channels_that_carry_outliers(tmp_path: Path) -> None:
    # A planted outlier: input channel 7 of every layer's input reaches 100x the others in the calibration
    # forward. It must be one of the float32 channels, and each channel's smoothing must follow
    # s_j = max|X_j|^0.5 / max|W_j|^0.5 for the peaks the calibration saw.
    from loraplex.model import quant

    base = save_tiny(LlamaConfig(**TINY), tmp_path / "base")
    llm = LLM(str(base), device="cpu", max_model_len=128)  # also: calibration sequences fit 128 positions
    model = llm.engine.runner.model
    weights = {name: m.dense_t().clone() for name, m in model.named_modules() if isinstance(m, PackedLinear)}
    real = quant.input_absmax
    seen = {}

    def planted(model: object, token_ids: list[int]) -> dict:
        peaks = {layer: peak.clone() for layer, peak in real(model, token_ids).items()}  # type: ignore[arg-type]
        for peak in peaks.values():
            peak[7] = 100 * peak.max()
        seen.update(peaks)
        return peaks

    quant.input_absmax = planted  # type: ignore[assignment]
    try:
        quantize_model(model, "int8", None)
    finally:
        quant.input_absmax = real  # type: ignore[assignment]
    for name, layer in model.named_modules():
        if not isinstance(layer, PackedLinear):
            continue
        q = layer.quantized
        assert isinstance(q, Int8Weight) and 7 in q.outliers.tolist(), name
        x_max = seen[layer].clamp(min=1e-5)
        w_max = weights[name].abs().amax(dim=1).clamp(min=1e-5)
        smooth = (x_max.sqrt() / w_max.sqrt()).clamp(min=1e-5)
        torch.testing.assert_close(q.inv_smooth, 1 / smooth)
        # and the four float channels are the largest after smoothing
        assert set(q.outliers.tolist()) == set((x_max / smooth).topk(4).indices.tolist()), name
