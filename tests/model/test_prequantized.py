"""Pre-quantized GPTQ and AWQ checkpoints (loraplex/model/prequantized.py).

The packed tensors here are written by packers that follow the formats' reference code line by line
(cited at each), from integer weights, scales and zeros chosen by the test; the decoded weights must equal
the formats' dequantization formulas computed from those integers, element for element. A whole tiny
model saved as GPTQ loads and generates exactly as the same model saved in float with those weights.
Broken checkpoints fail at load with the field or tensor named."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig

from loraplex import LLM, SamplingParams
from loraplex.model.errors import CheckpointError
from loraplex.model.layers import PackedLinear
from loraplex.model.prequantized import checkpoint_format, dequantizing
from loraplex.model.quant import Int4Weight, quantize_int4
from tests.helpers import TINY, save_tiny


def _ints(shape: tuple[int, ...], bits: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 2 ** bits, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int64)


def pack_gptq(intweight: np.ndarray, zeros: np.ndarray, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoGPTQ's packing, as in auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py, QuantLinear.pack:
    `intweight` [in, out] (already transposed, as `intweight.t()` there), `zeros` [groups, out] (before its
    `zeros -= 1`)."""
    intweight = intweight.astype(np.uint32)
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    i = 0
    row = 0
    while row < qweight.shape[0]:
        for j in range(i, i + (32 // bits)):
            qweight[row] |= intweight[j] << (bits * (j - i))
        i += 32 // bits
        row += 1
    zeros = (zeros - 1).astype(np.uint32)  # `zeros -= 1` (a zero of 0 wraps, as in the reference)
    qzeros = np.zeros((zeros.shape[0], zeros.shape[1] // 32 * bits), dtype=np.uint32)
    i = 0
    col = 0
    while col < qzeros.shape[1]:
        for j in range(i, i + (32 // bits)):
            qzeros[:, col] |= zeros[:, j] << (bits * (j - i))
        i += 32 // bits
        col += 1
    return torch.from_numpy(qweight.astype(np.int32)), torch.from_numpy(qzeros.astype(np.int32))


def pack_awq(intweight: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoAWQ's GEMM packing, as in awq/modules/linear/gemm.py, WQLinear_GEMM.from_linear (w_bit 4):
    `intweight` [in, out], `zeros` [groups, out]."""
    w_bit, pack_num = 4, 8
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    intweight = intweight.to(torch.int32)
    qweight = torch.zeros((intweight.shape[0], intweight.shape[1] // 32 * w_bit), dtype=torch.int32)
    for col in range(intweight.shape[1] // pack_num):
        for i in range(pack_num):
            qweight[:, col] |= intweight[:, col * pack_num + order_map[i]] << (i * w_bit)
    zeros = zeros.to(torch.int32)
    qzeros = torch.zeros((zeros.shape[0], zeros.shape[1] // 32 * w_bit), dtype=torch.int32)
    for col in range(zeros.shape[1] // pack_num):
        for i in range(pack_num):
            qzeros[:, col] |= zeros[:, col * pack_num + order_map[i]] << (i * w_bit)
    return qweight, qzeros


def _decode(config: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    fmt = checkpoint_format(type("Config", (), {"quantization_config": config})())
    assert fmt is not None
    return dict(dequantizing(iter(tensors.items()), fmt))


@pytest.mark.parametrize(("bits", "group_size", "desc_act", "checkpoint_format", "with_g_idx"), [
    (4, 32, False, "gptq", True), (8, 16, False, "gptq", True), (2, -1, False, "gptq", True),
    (4, 16, True, "gptq", True), (4, 32, False, "gptq_v2", True), (4, 32, False, "gptq", False),
    (8, -1, False, "gptq", False)])
def test_gptq_layers_decode_to_the_reference_formula(bits: int, group_size: int, desc_act: bool,
                                                      checkpoint_format: str, with_g_idx: bool) -> None:
    in_f, out_f = 64, 96  # multiples of 32, as the reference packers assume
    groups = 1 if group_size == -1 else in_f // group_size
    q = _ints((in_f, out_f), bits, 1)
    zeros = _ints((groups, out_f), bits, 2).clamp(min=1)  # a zero of 0 would wrap in AutoGPTQ's v1 format
    scales = (torch.rand(groups, out_f, generator=torch.Generator().manual_seed(3)) / 10 + 0.01).half()
    g_idx = torch.arange(in_f) // (group_size if group_size > 0 else in_f)
    if desc_act:  # act-order: input rows reach their groups in a permuted order
        g_idx = g_idx[torch.randperm(in_f, generator=torch.Generator().manual_seed(4))]
    qweight, qzeros = pack_gptq(q.numpy(), zeros.numpy() + (0 if checkpoint_format == "gptq" else 1), bits)
    config = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": False,
              "checkpoint_format": checkpoint_format}
    tensors = {"layer.qweight": qweight, "layer.qzeros": qzeros, "layer.scales": scales, "norm.weight": torch.ones(3)}
    if with_g_idx:  # older checkpoints without act-order carry none: rows are in groups of group_size
        tensors["layer.g_idx"] = g_idx.to(torch.int32)
    out = _decode(config, tensors)
    assert set(out) == {"norm.weight", "layer.weight"}
    # AutoGPTQ's dequantization (qlinear_cuda_old.py forward): scales[g_idx] * (weight - zeros[g_idx]), with
    # the stored zeros + 1 in the `gptq` format.
    want = (scales.float()[g_idx] * (q - zeros[g_idx]).float()).t()
    assert torch.equal(out["layer.weight"], want)


@pytest.mark.parametrize("group_size", [32, -1])
def test_awq_layers_decode_to_the_reference_formula(group_size: int) -> None:
    in_f, out_f = 64, 96
    groups = 1 if group_size == -1 else in_f // group_size
    q, zeros = _ints((in_f, out_f), 4, 5), _ints((groups, out_f), 4, 6)
    scales = (torch.rand(groups, out_f, generator=torch.Generator().manual_seed(7)) / 10 + 0.01).half()
    qweight, qzeros = pack_awq(q, zeros)
    config = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"}
    out = _decode(config, {"l.qweight": qweight, "l.qzeros": qzeros, "l.scales": scales})
    g = torch.arange(in_f) // (group_size if group_size > 0 else in_f)
    # AutoAWQ's dequantize_gemm (awq/utils/packing_utils.py): (iweight - izeros) * scales, per group.
    assert torch.equal(out["l.weight"], ((q - zeros[g]).float() * scales.float()[g]).t())


def _gptq_layer(in_f: int = 64, out_f: int = 64) -> dict[str, torch.Tensor]:
    qweight, qzeros = pack_gptq(_ints((in_f, out_f), 4, 1).numpy(), _ints((2, out_f), 4, 2).clamp(min=1).numpy(), 4)
    return {"l.qweight": qweight, "l.qzeros": qzeros, "l.scales": torch.ones(2, out_f, dtype=torch.half),
            "l.g_idx": (torch.arange(in_f) // 32).to(torch.int32)}


GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False}


@pytest.mark.parametrize(("config", "change", "message"), [
    ({**GPTQ, "bits": 3}, {}, "quantization_config.bits = 3 is not supported; supported: 2, 4, 8"),
    ({**GPTQ, "quant_method": "bitsandbytes"}, {}, "quant_method 'bitsandbytes' is not supported"),
    ({**GPTQ, "checkpoint_format": "marlin"}, {}, "checkpoint_format 'marlin' is not supported"),
    ({**GPTQ, "group_size": 0}, {}, r"group_size must be -1 or in \[1, 2\^24\], got 0"),
    ({**GPTQ, "group_size": 10 ** 30}, {}, r"group_size must be -1 or in \[1, 2\^24\]"),
    (GPTQ, {"l.scales": torch.full((2, 64), float("nan"), dtype=torch.half)}, "l.scales holds NaN or infinite values"),
    (GPTQ, {"l.g_idx": torch.zeros(64)}, "l.g_idx must hold integers, got torch.float32"),
    (GPTQ, {"l.weight": torch.zeros(64, 64)}, "l is stored both as a float weight and as gptq tensors"),
    (GPTQ, {"l.scales": None}, "l: the gptq layer lacks scales"),
    (GPTQ, {"l.scales": torch.ones(3, 64, dtype=torch.half)}, "l.scales has 3 groups, expected 2"),
    (GPTQ, {"l.qzeros": torch.zeros(2, 5, dtype=torch.int32)}, r"l.qzeros has shape \(2, 5\), expected \(2, 8\)"),
    (GPTQ, {"l.qweight": torch.zeros(8, 48, dtype=torch.float32)}, "l.qweight must be a 2-D int32 tensor"),
    (GPTQ, {"l.g_idx": torch.full((64,), 7, dtype=torch.int32)}, r"l.g_idx names groups outside \[0, 2\)"),
    ({"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemv"}, {}, "version 'gemv' is not supported"),
    ({"quant_method": "awq", "w_bit": 8, "q_group_size": 32}, {}, "quantization_config.w_bit = 8 is not supported"),
])
def test_bad_quantized_checkpoints_fail_naming_the_field_or_tensor(config: dict, change: dict, message: str) -> None:
    tensors = _gptq_layer()
    for name, tensor in change.items():
        if tensor is None:
            del tensors[name]
        else:
            tensors[name] = tensor
    with pytest.raises(CheckpointError, match=message):
        _decode(config, tensors)


def _rtn_integers(w: torch.Tensor, group: int, bits: int) -> tuple[torch.Tensor, ...]:
    """Round-to-nearest GPTQ integers for `w` [in, out] with per-group asymmetric scales: (q, zeros, scales)."""
    wg = w.reshape(w.shape[0] // group, group, -1)
    lo, hi = wg.amin(1), wg.amax(1)  # [groups, out]
    scales = ((hi - lo) / (2 ** bits - 1)).clamp(min=1e-4).half()
    zeros = torch.round(-lo / scales.float()).clamp(1, 2 ** bits - 1).to(torch.int64)
    q = torch.round(wg / scales.float()[:, None] + zeros[:, None]).clamp(0, 2 ** bits - 1).to(torch.int64)
    return q.reshape(w.shape), zeros, scales


def _gptq_and_twin(tmp_path: Path, integers: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
                   group: int = 32, bits: int = 4) -> tuple[Path, Path]:
    """A tiny model's linears saved as GPTQ (`integers(w)` → q, zeros, scales for w [in, out]) and its float
    twin holding the weights those integers stand for."""
    float_dir = save_tiny(LlamaConfig(**TINY), tmp_path / "float")
    state = load_file(float_dir / "model.safetensors")
    quantized, dequantized = {}, {}
    for name, weight in state.items():
        if not name.endswith("_proj.weight"):
            quantized[name] = dequantized[name] = weight
            continue
        q, zeros, scales = integers(weight.t())
        prefix = name.removesuffix(".weight")
        quantized[f"{prefix}.qweight"], quantized[f"{prefix}.qzeros"] = pack_gptq(q.numpy(), zeros.numpy(), bits)
        quantized[f"{prefix}.scales"] = scales
        quantized[f"{prefix}.g_idx"] = (torch.arange(q.shape[0]) // group).to(torch.int32)
        g = torch.arange(q.shape[0]) // group
        dequantized[name] = (scales.float()[g] * (q - zeros[g]).float()).t().contiguous()
    gptq_dir, twin_dir = tmp_path / "gptq", tmp_path / "twin"
    for folder, tensors, extra in ((gptq_dir, quantized, {"quantization_config": {
            **GPTQ, "bits": bits, "group_size": group, "sym": False}}), (twin_dir, dequantized, {})):
        folder.mkdir()
        save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors")
        config = json.loads((float_dir / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **extra}))
    return gptq_dir, twin_dir


def test_a_gptq_model_generates_exactly_as_its_dequantized_float_twin(tmp_path: Path) -> None:
    gptq_dir, twin_dir = _gptq_and_twin(tmp_path, lambda w: _rtn_integers(w, 32, 4))
    prompts = [[(7 * i + j) % 500 + 1 for j in range(5 + i)] for i in range(4)]
    params = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True, logprobs=1)
    got = LLM(str(gptq_dir), device="cpu").generate(prompts, params)
    want = LLM(str(twin_dir), device="cpu").generate(prompts, params)
    for g_out, w_out in zip(got, want, strict=True):
        assert g_out.token_ids == w_out.token_ids
        assert [lp.logprob for lp in g_out.logprobs or []] == [lp.logprob for lp in w_out.logprobs or []]
    with pytest.raises(CheckpointError, match="quantization_config.bits = 5 is not supported"):
        (gptq_dir / "config.json").write_text(json.dumps({**json.loads((gptq_dir / "config.json").read_text()),
                                                          "quantization_config": {**GPTQ, "bits": 5}}))
        LLM(str(gptq_dir), device="cpu")


def test_quantize_int4_keeps_a_4_bit_checkpoints_own_grid(tmp_path: Path) -> None:
    # Integers 2..13 with zeros 4..11: no group spans its grid from end to end, so rounding the decoded
    # weights anew (on the grid from each group's minimum to its maximum) would move them; the checkpoint's
    # own grid keeps them.
    def integers(w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(w.numel())
        groups = w.shape[0] // 32
        q = torch.randint(2, 14, w.shape, generator=g)
        zeros = torch.randint(4, 12, (groups, w.shape[1]), generator=g)
        scales = (torch.rand(groups, w.shape[1], generator=g) / 20 + 0.01).half()
        return q, zeros, scales

    gptq_dir, twin_dir = _gptq_and_twin(tmp_path, integers)
    twin = LLM(str(twin_dir), device="cpu")
    llm = LLM(str(gptq_dir), device="cpu", quantize="int4")
    assert_keeps_the_checkpoint_grid(llm, twin, lambda layer: 32)
    assert_generates_as(llm, twin)
    # Where the checkpoint's grid is not one Int4Weight holds (groups of 16), int4 rounds the decoded weights.
    grouped_16, _ = _gptq_and_twin(tmp_path / "g16", lambda w: _rtn_integers(w, 16, 4), group=16)
    model = LLM(str(grouped_16), device="cpu", quantize="int4").engine.runner.model
    assert all(m.quantized.group == 32 for n, m in model.named_modules()  # type: ignore[union-attr]
               if isinstance(m, PackedLinear) and n != "lm_head")


def assert_keeps_the_checkpoint_grid(llm: LLM, twin: LLM, group: Callable[[PackedLinear], int],
                                     anew_moves: bool = True) -> None:
    """Every linear of `llm` but the LM head holds an Int4Weight on groups of `group(layer)` inputs that decodes
    to `twin`'s float weights within 1e-6; with `anew_moves`, rounding those weights anew would have moved them
    by more than 1e-3 (what keeping the grid avoids)."""
    want = dict(twin.engine.runner.model.named_modules())
    checked = 0
    for name, module in llm.engine.runner.model.named_modules():
        if isinstance(module, PackedLinear) and name != "lm_head":
            assert isinstance(module.quantized, Int4Weight) and module.quantized.group == group(module), name
            weight = want[name].dense_t()  # [in, out], the float twin's shards side by side
            assert (module.quantized.dense_t() - weight).abs().max() <= 1e-6 * weight.abs().max(), name
            if anew_moves:
                assert (quantize_int4(weight).dense_t() - weight).abs().max() > 1e-3 * weight.abs().max(), name
            checked += 1
    assert checked == 4 * TINY["num_hidden_layers"]  # qkv, o, gate_up, down


def assert_generates_as(llm: LLM, twin: LLM) -> None:
    """Greedy tokens equal, and their logprobs within float rounding (another GEMM's summation order)."""
    prompts = [[(7 * i + j) % 500 + 1 for j in range(5 + i)] for i in range(4)]
    params = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True, logprobs=1)
    for got, ref in zip(llm.generate(prompts, params), twin.generate(prompts, params), strict=True):
        assert got.token_ids == ref.token_ids
        assert [lp.logprob for lp in got.logprobs or []] == pytest.approx([lp.logprob for lp in ref.logprobs or []],
                                                                          abs=1e-4)


def test_only_4_bit_groups_of_32_inputs_in_order_are_kept_as_int4() -> None:
    in_f, out_f = 64, 96
    q, zeros = _ints((in_f, out_f), 4, 1), _ints((2, out_f), 4, 2).clamp(min=1)
    scales = (torch.rand(2, out_f, generator=torch.Generator().manual_seed(3)) / 10 + 0.01).half()
    qweight, qzeros = pack_gptq(q.numpy(), zeros.numpy(), 4)
    tensors = {"l.qweight": qweight, "l.qzeros": qzeros, "l.scales": scales,
               "l.g_idx": (torch.arange(in_f) // 32).to(torch.int32)}

    def kept(config: dict, tensors: dict[str, torch.Tensor]) -> dict[str, Int4Weight]:
        fmt = checkpoint_format(type("Config", (), {"quantization_config": config})())
        assert fmt is not None
        int4: dict[str, Int4Weight] = {}
        out = dict(dequantizing(iter(tensors.items()), fmt, int4))
        for name, weight in int4.items():  # each the decoded float weight, on its own grid
            assert (weight.dense() - out[name]).abs().max() <= 1e-6 * out[name].abs().max()
        return int4

    assert set(kept({**GPTQ, "sym": False}, tensors)) == {"l.weight"}
    shuffled = (torch.arange(in_f) // 32)[torch.randperm(in_f, generator=torch.Generator().manual_seed(4))]
    assert kept({**GPTQ, "desc_act": True}, {**tensors, "l.g_idx": shuffled.to(torch.int32)}) == {}  # act-order
    wrapped = zeros.clone()
    wrapped[0, 0] = 0  # AutoGPTQ's v1 format stores zero - 1: a zero of 0 wraps to 15 and decodes as 16
    _, wrapped_z = pack_gptq(q.numpy(), wrapped.numpy(), 4)
    assert kept({**GPTQ, "sym": False}, {**tensors, "l.qzeros": wrapped_z}) == {}
    q8, z8 = pack_gptq(_ints((in_f, out_f), 8, 1).numpy(), zeros.numpy(), 8)
    assert kept({**GPTQ, "bits": 8}, {**tensors, "l.qweight": q8, "l.qzeros": z8}) == {}
    awq_q, awq_z = pack_awq(q, zeros)
    awq = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}
    assert set(kept(awq, {"l.qweight": awq_q, "l.qzeros": awq_z, "l.scales": scales})) == {"l.weight"}


def test_a_packed_layer_keeps_its_checkpoint_grid_only_when_every_shard_has_one() -> None:
    from loraplex.model.loader import _own_int4

    def grid(rows: int, group: int = 32, seed: int = 0) -> Int4Weight:
        return quantize_int4(torch.randn(64, rows, generator=torch.Generator().manual_seed(seed)), group)

    attn = "model.layers.0.self_attn"
    q, k, v = grid(16, seed=1), grid(8, seed=2), grid(8, seed=3)
    int4 = {f"{attn}.q_proj.weight": q, f"{attn}.k_proj.weight": k, f"{attn}.v_proj.weight": v,
            f"{attn}.o_proj.weight": grid(16, seed=4)}
    kept = _own_int4(int4, f"{attn}.qkv_proj", torch.device("cpu"))
    assert kept is not None and torch.equal(kept.dense(), torch.cat([q.dense(), k.dense(), v.dense()]))
    assert _own_int4(int4, f"{attn}.o_proj", torch.device("cpu")) is not None
    assert int4 == {}  # taken out as they are used
    # A shard without a grid of its own (rounded anew), or shards on groups of different sizes: none kept.
    assert _own_int4({f"{attn}.q_proj.weight": q, f"{attn}.k_proj.weight": k}, f"{attn}.qkv_proj",
                     torch.device("cpu")) is None
    assert _own_int4({f"{attn}.q_proj.weight": q, f"{attn}.k_proj.weight": k, f"{attn}.v_proj.weight": grid(8, 64)},
                     f"{attn}.qkv_proj", torch.device("cpu")) is None
